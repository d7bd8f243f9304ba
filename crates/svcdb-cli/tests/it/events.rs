//! `svcdb events purge` and `svcdb events replay` end to end: the real binary against a
//! throwaway database and the real broker. Outcomes are matched by exit code and `--json`
//! fields.

use crate::common;

use common::Project;
use serde_json::{json, Value};
use svcdb::ServiceDb;

/// A service schema with both event tables: `old` claims and published rows from eight
/// days ago, one fresh claim, one row published just now, and one old row never published.
async fn service_with_old_rows(p: &Project, old: i64) -> ServiceDb {
    let db = p.db.service(&p.schema).await;
    db.install_idempotency().await.unwrap();
    db.install_outbox().await.unwrap();
    db.get()
        .await
        .unwrap()
        .execute(
            "WITH claims AS (
                 INSERT INTO svcdb_processed_events (consumer, event_id, processed_at)
                 SELECT 'orders.reserve-stock', gen_random_uuid(), now() - interval '8 days'
                   FROM generate_series(1, $1::bigint)
                 UNION ALL SELECT 'orders.reserve-stock', gen_random_uuid(), now()
             )
             INSERT INTO svcdb_outbox (id, exchange, routing_key, envelope, created_at, published_at)
             SELECT gen_random_uuid(), 'orders', 'order.placed', '{}'::jsonb,
                    now() - interval '8 days', now() - interval '8 days'
               FROM generate_series(1, $1::bigint)
             UNION ALL SELECT gen_random_uuid(), 'orders', 'order.placed', '{}'::jsonb, now(), now()
             UNION ALL SELECT gen_random_uuid(), 'orders', 'order.placed', '{}'::jsonb,
                    now() - interval '8 days', NULL",
            &[&old],
        )
        .await
        .unwrap();
    db
}

async fn count(db: &ServiceDb, table: &str) -> i64 {
    db.get()
        .await
        .unwrap()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// `(table, exists, deleted)` of each entry of a `--json` report.
fn tables(report: &Value) -> Vec<(String, bool, u64)> {
    report["tables"]
        .as_array()
        .unwrap_or_else(|| panic!("no tables list: {report}"))
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_owned(),
                t["exists"].as_bool().unwrap(),
                t["deleted"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn events_purge_deletes_old_claims_and_published_rows_and_keeps_the_rest() {
    let p = Project::new().await;
    // More than two of the library's batches.
    let db = service_with_old_rows(&p, 2500).await;

    let report = p
        .run(&["events", "purge", "--older-than", "7d", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(report["older_than_secs"], json!(604_800.0));
    assert_eq!(
        tables(&report),
        [
            ("svcdb_processed_events".to_owned(), true, 2500),
            ("svcdb_outbox".to_owned(), true, 2500),
        ]
    );
    assert_eq!(
        count(&db, "svcdb_processed_events").await,
        1,
        "the fresh claim"
    );
    assert_eq!(
        count(&db, "svcdb_outbox").await,
        2,
        "the fresh row, and the old one never published"
    );

    // Again: nothing is old enough, and that is a success.
    let out = p
        .run(&["events", "purge", "--older-than", "7d"])
        .expect_code(0);
    assert!(
        out.stdout
            .contains("svcdb_processed_events: deleted 0 rows older than 7d"),
        "{out}"
    );
}

#[tokio::test]
async fn events_purge_table_picks_one_table() {
    let p = Project::new().await;
    let db = service_with_old_rows(&p, 3).await;

    let report = p
        .run(&[
            "events",
            "purge",
            "--older-than",
            "24h",
            "--table",
            "outbox",
            "--json",
        ])
        .expect_code(0)
        .json();
    assert_eq!(tables(&report), [("svcdb_outbox".to_owned(), true, 3)]);
    assert_eq!(
        count(&db, "svcdb_processed_events").await,
        4,
        "claims untouched"
    );

    let report = p
        .run(&[
            "events",
            "purge",
            "--older-than",
            "24h",
            "--table",
            "claims",
            "--json",
        ])
        .expect_code(0)
        .json();
    assert_eq!(
        tables(&report),
        [("svcdb_processed_events".to_owned(), true, 3)]
    );
}

#[tokio::test]
async fn events_purge_skips_an_absent_table_unless_it_was_named() {
    let p = Project::new().await;
    let db = p.db.service(&p.schema).await;
    db.install_idempotency().await.unwrap(); // a consumer-only service: no outbox

    let report = p
        .run(&["events", "purge", "--older-than", "7d", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(
        tables(&report),
        [
            ("svcdb_processed_events".to_owned(), true, 0),
            ("svcdb_outbox".to_owned(), false, 0),
        ]
    );

    let out = p
        .run(&["events", "purge", "--older-than", "7d", "--table", "outbox"])
        .expect_code(1);
    assert!(out.stderr.contains("no svcdb_outbox table"), "{out}");
    assert!(out.stderr.contains("hint: check --schema"), "{out}");
}

#[tokio::test]
async fn events_purge_refuses_a_retention_of_zero_or_nonsense() {
    let p = Project::new().await;
    let db = service_with_old_rows(&p, 1).await;

    // 0 is under an hour: refused for claims like any such retention, and fine for the
    // outbox alone, whose published rows are done with (found by a user trial: it was refused
    // there too, as "would delete every claim").
    let out = p
        .run(&["events", "purge", "--older-than", "0"])
        .expect_code(64);
    // Said as given (found by a user trial: "0d").
    assert!(out.stderr.contains("--older-than 0s "), "{out}");
    p.run(&["events", "purge", "--older-than", "0", "--table", "outbox"])
        .expect_code(0);
    let out = p
        .run(&["events", "purge", "--older-than", "soon"])
        .expect_code(64);
    assert!(out.stderr.contains("--older-than"), "{out}");
    p.run(&["events", "purge"]).expect_code(64);
    p.run(&["events", "purge", "--older-than", "7d", "--table", "inbox"])
        .expect_code(64);
    // Claims younger than an hour may belong to messages still to be redelivered (a user
    // trial purged 4 605 live claims with `--older-than 1s`): refused without --force.
    let out = p
        .run(&["events", "purge", "--older-than", "30m", "--json"])
        .expect_code(64);
    assert_eq!(out.json()["code"], "usage", "{out}");
    assert_eq!(
        count(&db, "svcdb_processed_events").await,
        2,
        "nothing deleted"
    );
    // The controls: the outbox alone, or claims with --force.
    p.run(&["events", "purge", "--older-than", "1s", "--table", "outbox"])
        .expect_code(0);
    p.run(&["events", "purge", "--older-than", "30m", "--force"])
        .expect_code(0);
    assert_eq!(count(&db, "svcdb_processed_events").await, 1);
}

/// Found by a README walkthrough: run as another service's role, which may not use the
/// schema, purge reported both tables absent (exit 0). It now says the role may not use it.
#[tokio::test]
async fn events_purge_as_a_role_without_usage_on_the_schema_says_so() {
    let p = Project::new().await;
    let db = service_with_old_rows(&p, 3).await;
    let (other, _) = p.db.provision("elsewhere", "elsewhere_schema").await;
    let url = p.db.url_as(&other);
    let out = p
        .run_with_env(
            &["events", "purge", "--older-than", "7d", "--json"],
            &[
                ("DATABASE_URL", url.as_str()),
                ("SVCDB_CREATE_SCHEMA", "false"),
            ],
        )
        .expect_code(1);
    assert!(out.stderr.contains("USAGE"), "{out}");
    assert_eq!(
        count(&db, "svcdb_processed_events").await,
        4,
        "nothing deleted"
    );
    // The control: as the schema's owner, the same purge deletes the old rows.
    p.run(&["events", "purge", "--older-than", "7d"])
        .expect_code(0);
    assert_eq!(count(&db, "svcdb_processed_events").await, 1);
}

/// The queue `name`, its dead-letter queue holding `n` messages (bodies `dead 0`, `dead 1`,
/// …), and the channel they were declared on.
async fn dead_letters(
    name: &str,
    n: usize,
) -> (svcdb_amqp::lapin::Connection, svcdb_amqp::lapin::Channel) {
    use svcdb_amqp::lapin::options::BasicPublishOptions;
    use svcdb_amqp::lapin::BasicProperties;
    use svcdb_amqp::topology::{QueueSpec, Topology};
    let connection = svcdb_amqp::AmqpConfig::from_env()
        .unwrap()
        .connect()
        .await
        .unwrap();
    let spec = QueueSpec::new(name);
    Topology::new()
        .queue(spec.clone())
        .declare(&connection)
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for i in 0..n {
        channel
            .basic_publish(
                "".into(),
                spec.dead_letter_queue().as_str().into(),
                BasicPublishOptions::default(),
                format!("dead {i}").as_bytes(),
                BasicProperties::default()
                    .with_message_id(format!("m{i}").into())
                    .with_headers(dead_letter_headers()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    (connection, channel)
}

/// What a message the broker dead-lettered itself carries, and where svcdb's consumer said it
/// came from.
fn dead_letter_headers() -> svcdb_amqp::lapin::types::FieldTable {
    use svcdb_amqp::lapin::types::{AMQPValue, FieldTable};
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
    headers.insert(
        "x-svcdb-original-exchange".into(),
        AMQPValue::LongString("shop.events".into()),
    );
    headers
}

/// The bodies waiting in `queue`, taken off it, with whether each kept the origin header and
/// lost the broker's `x-death`.
async fn drain(channel: &svcdb_amqp::lapin::Channel, queue: &str) -> Vec<(String, bool)> {
    use svcdb_amqp::lapin::options::BasicGetOptions;
    let mut bodies = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let as_replayed = headers.inner().contains_key("x-svcdb-original-exchange")
            && !headers.inner().contains_key("x-death");
        bodies.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            as_replayed,
        ));
    }
    bodies
}

/// Found by a shop trial: the README said dead letters can be replayed after a fix, and
/// nothing said how. `svcdb events replay` moves them back, oldest first, up to `--limit`.
#[tokio::test]
async fn replay_moves_dead_letters_back_to_their_queue() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("svcdb-cli-replay-{}-{nanos}", std::process::id());
    let (connection, channel) = dead_letters(&name, 3).await;
    let dlq = format!("{name}.dlq");

    let out = common::svcdb(
        &[
            "events", "replay", "--queue", &name, "--limit", "2", "--json",
        ],
        &[],
        None,
    )
    .expect_code(0)
    .json();
    assert_eq!(
        (out["replayed"].clone(), out["left"].clone()),
        (json!(2), json!(1)),
        "{out}"
    );
    let out = common::svcdb(&["events", "replay", "--queue", &name], &[], None).expect_code(0);
    assert!(out.stdout.contains("replayed 1 message"), "{out}");
    assert_eq!(drain(&channel, &dlq).await, []);
    let replayed = drain(&channel, &name).await;
    let bodies: Vec<&str> = replayed.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(bodies, ["dead 0", "dead 1", "dead 2"]);
    assert!(
        replayed.iter().all(|(_, as_replayed)| *as_replayed),
        "{replayed:?}"
    );

    // A queue that does not exist is not created.
    let missing = format!("{name}-missing");
    let out = common::svcdb(
        &["events", "replay", "--queue", &missing, "--json"],
        &[],
        None,
    )
    .expect_code(1)
    .json();
    assert_eq!(out["code"], "not_found", "{out}");

    for queue in [&name, &dlq] {
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    channel
        .exchange_delete(
            svcdb_amqp::QueueSpec::new(&name)
                .dead_letter_exchange()
                .as_str()
                .into(),
            Default::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;
}

/// Found by a user trial: a `--queue` of 252 to 255 bytes (a valid queue name, whose
/// dead-letter queue `<queue>.dlq` AMQP cannot name) or longer made the binary panic (exit
/// 101) in lapin. No replay of such a queue can work: a usage error.
#[test]
fn replay_refuses_a_queue_whose_names_amqp_cannot_carry() {
    for len in [252, 255, 256, 300] {
        let queue = "q".repeat(len);
        let out = common::svcdb(
            &["events", "replay", "--queue", &queue, "--json"],
            &[],
            None,
        )
        .expect_code(64)
        .json();
        assert_eq!(out["code"], "usage", "{len}: {out}");
    }
}

/// Found by a user trial: an AMQP URL whose vhost is over 255 bytes made the binary panic
/// (exit 101) in lapin; it is a configuration error, a usage error as a malformed
/// DATABASE_URL is. So is an AMQP URL missing the `//` after its scheme, which the broker's
/// refusal would print with its password (found by another user trial).
#[test]
fn replay_with_a_vhost_amqp_cannot_carry_is_a_configuration_error() {
    let long = format!("amqp://guest:guest@127.0.0.1:5672/{}", "v".repeat(300));
    let one_slash = "amqp:/guest:SECRETX@127.0.0.1/%2f";
    for url in [long.as_str(), one_slash] {
        for (args, env) in [
            (vec!["--amqp-url", url], vec![]),
            (vec![], vec![("AMQP_URL", url)]),
        ] {
            let mut all = vec!["events", "replay", "--queue", "orders.q", "--json"];
            all.extend(args);
            let out = common::svcdb(&all, &env, None).expect_code(64);
            assert!(
                !out.stdout.contains("SECRETX") && !out.stderr.contains("SECRETX"),
                "{out}"
            );
            assert_eq!(out.json()["code"], "config", "{url}");
        }
    }
}

/// An empty `AMQP_URL` is unset (the local broker), as an empty `DATABASE_URL` is: clap hands
/// it to the command as the URL "".
#[test]
fn replay_treats_an_empty_amqp_url_as_unset() {
    let queue = format!("svcdb-cli-replay-missing-{}", std::process::id());
    for empty in ["", " "] {
        let out = common::svcdb(
            &["events", "replay", "--queue", &queue, "--json"],
            &[("AMQP_URL", empty)],
            None,
        )
        .expect_code(1)
        .json();
        assert_eq!(out["code"], "not_found", "{empty:?}: {out}");
    }
}
