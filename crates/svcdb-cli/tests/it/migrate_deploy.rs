//! `svcdb migrate up` meeting a table lock held by live traffic: each retry is printed, and the
//! failure after the last one carries SQLSTATE 55P03.

use crate::common;

use common::Project;

#[tokio::test]
async fn up_prints_each_lock_retry_then_fails_with_the_lock_timeout() {
    let p = Project::new().await;
    p.write(&[("0001_items.up.sql", "CREATE TABLE items (id int);")]);
    p.run(&["migrate", "up"]).expect_code(0);
    // Live traffic: an open transaction that read the table, never ended during the run.
    let traffic = p.db.admin().await;
    traffic
        .batch_execute(&format!("BEGIN; SELECT count(*) FROM {}.items;", p.schema))
        .await
        .unwrap();
    p.write(&[(
        "0002_label.up.sql",
        "ALTER TABLE items ADD COLUMN label text;",
    )]);

    let out = p
        .run(&[
            "migrate",
            "up",
            "--lock-timeout",
            "100ms",
            "--lock-retries",
            "1",
        ])
        .expect_code(1);
    let retries: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("retry 1 of 1"))
        .collect();
    assert_eq!(retries.len(), 1, "{out}");
    assert!(retries[0].starts_with("up 0002 label:"), "{out}");
    assert!(out.stderr.contains("55P03"), "{out}");

    let json = p
        .run(&[
            "migrate",
            "up",
            "--json",
            "--lock-timeout",
            "100ms",
            "--lock-retries",
            "0",
        ])
        .expect_code(1)
        .json();
    assert_eq!(json["code"], "55P03", "{json}");
}
