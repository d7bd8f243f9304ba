//! Command-line settings at their extremes: a duration flag too long for a clock to add is a
//! wait without end, never a panic.

use crate::common;

use common::Project;

#[tokio::test]
async fn a_lock_wait_too_long_for_the_clock_waits_instead_of_panicking() {
    let project = Project::new().await;
    project.write(&[("1_one.sql", "CREATE TABLE one (id int);")]);
    // 1e19 s is a duration, but `Instant::now() + it` overflows.
    project
        .run(&["migrate", "up", "--lock-wait=1e19"])
        .expect_code(0);
    assert!(project.tables().await.contains(&"one".to_owned()));
}
