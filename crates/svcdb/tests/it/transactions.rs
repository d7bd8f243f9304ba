//! Transactions: commit on Ok, rollback on error, drop and panic; retry on serialization
//! failure and on a real deadlock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb, SqlState, TxOptions};

async fn setup() -> (TestDb, ServiceDb) {
    let db = TestDb::new().await;
    let svc = db.service("orders").await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL)")
        .await
        .unwrap();
    (db, svc)
}

/// Fails unless every transaction on the test database has ended, and the rows with `ids` are
/// neither there nor locked. Counting rows from another session cannot tell: it never sees
/// uncommitted rows. A transaction left open holds its row locks, so inserting the same keys
/// would wait on them (and fail at the lock timeout, 55P03); it also shows as a backend
/// `idle in transaction`.
async fn assert_nothing_left_open(db: &TestDb, ids: &[i32]) {
    let admin = db.admin().await;
    db.assert_no_transaction_left_open().await;
    admin
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'")
        .await
        .unwrap();
    for id in ids {
        admin
            .execute("INSERT INTO orders.t VALUES ($1, 0)", &[id])
            .await
            .unwrap_or_else(|e| panic!("row {id}: {}", svcdb::error::pg_message(&e)));
    }
    admin.batch_execute("ROLLBACK").await.unwrap();
}

async fn count(svc: &ServiceDb) -> i64 {
    svc.get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn commits_on_ok() {
    let (_db, svc) = setup().await;
    let inserted = svc
        .transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
            Ok::<_, Error>(1)
        })
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    assert_eq!(count(&svc).await, 1);
}

#[tokio::test]
async fn rolls_back_when_the_closure_returns_an_error() {
    let (db, svc) = setup().await;
    let err = svc
        .transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
            tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?; // duplicate key
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_nothing_left_open(&db, &[1]).await;
    assert_eq!(count(&svc).await, 0);

    #[derive(Debug)]
    enum AppError {
        OutOfStock,
        Db(#[allow(dead_code)] Error),
    }
    impl From<Error> for AppError {
        fn from(e: Error) -> Self {
            AppError::Db(e)
        }
    }
    let err = svc
        .transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (2, 0)", &[])
                .await
                .map_err(Error::from)?;
            Err::<(), _>(AppError::OutOfStock)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, AppError::OutOfStock));
    assert_nothing_left_open(&db, &[1, 2]).await;
    assert_eq!(count(&svc).await, 0, "an application error rolls back too");
}

#[tokio::test]
async fn rolls_back_when_dropped_uncommitted() {
    let (db, svc) = setup().await;
    {
        let mut conn = svc.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1, 0)", &[])
            .await
            .unwrap();
        // dropped without commit
    }
    assert_nothing_left_open(&db, &[1]).await;
    assert_eq!(count(&svc).await, 0);
}

/// Found by a user trial: a transaction whose future was dropped while a statement waited
/// (a request timeout) only queued its `ROLLBACK` behind that statement, so the server kept
/// running it, with the locks the transaction had taken, and the pool handed the connection to
/// the next caller, who waited behind it. Now the statement is cancelled and the connection
/// closed: the lock is free at once and the next transaction runs on another connection. The
/// control: the blocking session holds its row to the end of the test, and the abandoned
/// statement, not cancelled, would wait for it that long, longer than every wait below.
#[tokio::test]
async fn a_transaction_dropped_while_its_statement_waits_releases_its_locks_at_once() {
    let (db, svc) = setup().await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO t VALUES (1, 0), (2, 0)")
        .await
        .unwrap();
    // Another session holds row 1 to the end.
    let blocker = db.admin().await;
    blocker
        .batch_execute("BEGIN; UPDATE orders.t SET n = n WHERE id = 1")
        .await
        .unwrap();
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        svc.transaction(async |tx| {
            tx.execute("UPDATE t SET n = 1 WHERE id = 2", &[]).await?; // locks row 2
            tx.execute("UPDATE t SET n = 1 WHERE id = 1", &[]).await?; // waits for row 1
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(abandoned.is_err(), "the statement waited for row 1");
    // Row 2 is free well before the blocker lets go of row 1.
    let other = db.admin().await;
    other
        .batch_execute("SET lock_timeout = '3s'")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    other
        .execute("UPDATE orders.t SET n = 2 WHERE id = 2", &[])
        .await
        .unwrap_or_else(|e| panic!("row 2 still locked: {}", svcdb::error::pg_message(&e)));
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // The pool's next transaction does not wait behind the abandoned statement.
    let started = std::time::Instant::now();
    svc.transaction(async |tx| {
        tx.execute("UPDATE t SET n = 3 WHERE id = 2", &[]).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    blocker.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn rolls_back_when_the_closure_panics_or_is_cancelled() {
    let (db, svc) = setup().await;
    let panicking = {
        let svc = svc.clone();
        tokio::spawn(async move {
            svc.transaction(async |tx| {
                tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
                panic!("handler bug");
                #[allow(unreachable_code)]
                Ok::<_, Error>(())
            })
            .await
        })
    };
    assert!(panicking.await.unwrap_err().is_panic());

    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        svc.transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (2, 0)", &[]).await?;
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(cancelled.is_err());
    assert_nothing_left_open(&db, &[1, 2]).await;
    assert_eq!(count(&svc).await, 0);
}

/// Two transactions lock two rows in opposite orders: PostgreSQL's deadlock detector aborts one
/// with 40P01 (after `deadlock_timeout`, 1 s by default), and `transaction_with` runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_a_provoked_deadlock() {
    let (_db, svc) = setup().await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO t VALUES (1, 0), (2, 0)")
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let run = |svc: ServiceDb, order: [i32; 2]| {
        let (barrier, attempts, failures) = (barrier.clone(), attempts.clone(), failures.clone());
        async move {
            svc.transaction_with(&TxOptions::default(), async move |tx| {
                let first = attempts.fetch_add(1, Ordering::SeqCst) < 2;
                for (i, id) in order.iter().enumerate() {
                    if i == 1 && first {
                        barrier.wait().await; // each holds its first row before taking the other
                    }
                    let updated = tx
                        .execute("UPDATE t SET n = n + 1 WHERE id = $1", &[id])
                        .await;
                    if let Err(e) = &updated {
                        failures.lock().unwrap().push(e.code().cloned());
                    }
                    updated?;
                }
                Ok::<_, Error>(())
            })
            .await
        }
    };
    let a = tokio::spawn(run(svc.clone(), [1, 2]));
    let b = tokio::spawn(run(svc.clone(), [2, 1]));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        *failures.lock().unwrap(),
        [Some(SqlState::T_R_DEADLOCK_DETECTED)],
        "one of them was chosen as the deadlock's victim"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "the victim ran again");
    let rows: Vec<(i32, i32)> = svc
        .get()
        .await
        .unwrap()
        .query("SELECT id, n FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(rows, [(1, 2), (2, 2)], "each applied exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_a_provoked_serialization_failure() {
    let (_db, svc) = setup().await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO t VALUES (1, 0)")
        .await
        .unwrap();

    // Two serializable read-modify-write transactions on one row, made to overlap with a
    // barrier: one of them must fail with 40001 and be retried.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let run = |svc: ServiceDb, barrier: Arc<tokio::sync::Barrier>, attempts: Arc<AtomicU32>| async move {
        svc.transaction_with(&TxOptions::serializable(), async move |tx| {
            let first = attempts.fetch_add(1, Ordering::SeqCst) < 2;
            let n: i32 = tx
                .query_one("SELECT n FROM t WHERE id = 1", &[])
                .await?
                .get(0);
            if first {
                barrier.wait().await; // both have read before either writes
            }
            tx.execute("UPDATE t SET n = $1 WHERE id = 1", &[&(n + 1)])
                .await?;
            Ok::<_, Error>(())
        })
        .await
    };
    let a = tokio::spawn(run(svc.clone(), barrier.clone(), attempts.clone()));
    let b = tokio::spawn(run(svc.clone(), barrier.clone(), attempts.clone()));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "one transaction was retried"
    );
    let n: i32 = svc
        .get()
        .await
        .unwrap()
        .query_one("SELECT n FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "both increments applied exactly once");
}

#[tokio::test]
async fn gives_up_after_max_attempts_with_the_last_error() {
    let (_db, svc) = setup().await;
    let attempts = AtomicU32::new(0);
    let options = TxOptions {
        max_attempts: 3,
        ..TxOptions::serializable()
    };
    let err = svc
        .transaction_with(&options, async |tx| {
            attempts.fetch_add(1, Ordering::SeqCst);
            // Raise a real 40001 from the server.
            tx.batch_execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
            )
            .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    // A non-retryable error is not retried.
    let attempts = AtomicU32::new(0);
    let err = svc
        .transaction_with(&options, async |tx| {
            attempts.fetch_add(1, Ordering::SeqCst);
            tx.batch_execute("SELECT 1/0").await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

// Before the commit checked for it, this transaction was reported committed (Ok) with nothing
// committed: PostgreSQL answers the COMMIT of an aborted transaction with a rollback.
#[tokio::test]
async fn a_closure_that_drops_a_statement_error_gets_an_error_not_a_silent_rollback() {
    let (db, svc) = setup().await;
    let outcome = svc
        .transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
            // A duplicate key, caught and dropped: the transaction is aborted from here on.
            let _ = tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await;
            Ok::<_, Error>(())
        })
        .await;
    let e = outcome.expect_err("nothing was committed, so the transaction must not say Ok");
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    assert_eq!(count(&svc).await, 0);
    assert_nothing_left_open(&db, &[1]).await;
    // The connection is fine for the next transaction.
    svc.transaction(async |tx| {
        tx.execute("INSERT INTO t VALUES (2, 0)", &[]).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(count(&svc).await, 1);
}

// The `BEGIN` is not waited for: the first statement goes out behind it. What it carries must
// hold from that first statement on, at every isolation level and read-only.
#[tokio::test]
async fn the_first_statement_runs_inside_the_transaction_with_its_characteristics() {
    use svcdb::IsolationLevel;
    let (db, svc) = setup().await;
    for (isolation, name) in [
        (IsolationLevel::ReadCommitted, "read committed"),
        (IsolationLevel::RepeatableRead, "repeatable read"),
        (IsolationLevel::Serializable, "serializable"),
    ] {
        for read_only in [false, true] {
            let options = TxOptions {
                isolation,
                read_only,
                ..TxOptions::default()
            };
            let (level, ro): (String, String) = svc
                .transaction_with(&options, async |tx| {
                    let row = tx
                        .query_one(
                            "SELECT current_setting('transaction_isolation'), \
                             current_setting('transaction_read_only')",
                            &[],
                        )
                        .await?;
                    Ok::<_, Error>((row.get(0), row.get(1)))
                })
                .await
                .unwrap();
            assert_eq!(
                (level.as_str(), ro.as_str()),
                (name, if read_only { "on" } else { "off" })
            );
        }
    }
    // One transaction from the first statement: now() is its start, which a later statement's
    // own start (statement_timestamp) passes; each statement on its own would be equal.
    let one_transaction: bool = svc
        .transaction(async |tx| {
            tx.execute("SELECT pg_sleep(0.01)", &[]).await?;
            let row = tx
                .query_one("SELECT now() < statement_timestamp()", &[])
                .await?;
            Ok::<_, Error>(row.get(0))
        })
        .await
        .unwrap();
    assert!(one_transaction);
    // Read-only from the first statement: a write is refused (25006) and nothing is kept.
    let refused = svc
        .transaction_with(
            &TxOptions {
                read_only: true,
                ..TxOptions::default()
            },
            async |tx| {
                tx.execute("INSERT INTO t VALUES (2, 0)", &[]).await?;
                Ok::<_, Error>(())
            },
        )
        .await
        .expect_err("a read-only transaction refuses a write");
    assert_eq!(refused.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    assert_eq!(count(&svc).await, 0);
    assert_nothing_left_open(&db, &[2]).await;
}

#[tokio::test]
async fn a_savepoint_rolled_back_or_dropped_undoes_only_its_own_statements() {
    let (db, svc) = setup().await;
    svc.transaction(async |tx| {
        tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
        // An expected failure under a savepoint: rolled back to it, the transaction goes on.
        let savepoint = tx.savepoint("dup").await?;
        let duplicate = savepoint.execute("INSERT INTO t VALUES (1, 0)", &[]).await;
        assert_eq!(
            duplicate.expect_err("a duplicate key").code(),
            Some(&SqlState::UNIQUE_VIOLATION)
        );
        savepoint.rollback().await?;
        // Dropped without release: rolled back to it as well.
        let dropped = tx.savepoint("it's \"quoted\"").await?;
        dropped.execute("INSERT INTO t VALUES (2, 0)", &[]).await?;
        drop(dropped);
        // Released: its work stays.
        let kept = tx.savepoint("kept").await?;
        kept.execute("INSERT INTO t VALUES (3, 0)", &[]).await?;
        kept.release().await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let ids: Vec<i32> = svc
        .get()
        .await
        .unwrap()
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 3]);
    assert_nothing_left_open(&db, &[2]).await;
}

// The commit's check and the COMMIT go in one message: a COMMIT that fails itself (a deferred
// constraint) is the error, and leaves nothing open.
#[tokio::test]
async fn a_commit_that_fails_on_a_deferred_constraint_is_the_error() {
    let (db, svc) = setup().await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE d (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    let e = svc
        .transaction(async |tx| {
            tx.execute("INSERT INTO t VALUES (1, 0)", &[]).await?;
            // Both pass here: the unique check waits for the commit.
            tx.batch_execute("INSERT INTO d VALUES (1); INSERT INTO d VALUES (1)")
                .await?;
            Ok::<_, Error>(())
        })
        .await
        .expect_err("the deferred check fails the commit");
    assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION), "{e:?}");
    assert!(!matches!(e, Error::Aborted(_)), "{e:?}");
    assert_eq!(count(&svc).await, 0);
    assert_nothing_left_open(&db, &[1]).await;
}

// A service's own helpers that take the driver's `GenericClient` run in the transaction, on
// the client it dereferences to.
#[tokio::test]
async fn a_helper_taking_the_drivers_generic_client_runs_inside_the_transaction() {
    use svcdb::tokio_postgres::GenericClient;
    async fn insert(client: &impl GenericClient, id: i32) -> Result<u64, Error> {
        Ok(client
            .execute("INSERT INTO t VALUES ($1, 0)", &[&id])
            .await?)
    }
    let (db, svc) = setup().await;
    let outcome = svc
        .transaction(async |tx| {
            insert(tx.client(), 1).await?;
            Err::<(), _>(Error::PoolClosed)
        })
        .await;
    assert!(matches!(outcome, Err(Error::PoolClosed)));
    assert_eq!(count(&svc).await, 0, "rolled back with the transaction");
    assert_nothing_left_open(&db, &[1]).await;
}

/// A service on `db` whose pool holds one connection, so that every statement, and the
/// session's view of its prepared statements, is on that connection.
async fn one_connection(db: &TestDb) -> ServiceDb {
    let mut config = db.config("orders");
    config.pool_max = 1;
    let svc = ServiceDb::connect(config).await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL)")
        .await
        .unwrap();
    svc
}

/// How many prepared statements the pooled connection's session keeps with this text.
async fn kept(svc: &ServiceDb, sql: &str) -> i64 {
    svc.get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
            &[&sql],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn execute_prepares_a_statement_once_per_connection_but_never_keeps_one_returning_rows() {
    const INSERT: &str = "INSERT INTO t VALUES ($1, 0)";
    const RETURNING: &str = "UPDATE t SET n = n + 1 WHERE id = $1 RETURNING *";
    const DRIVERS: &str = "UPDATE t SET n = n + 1 WHERE id = $1";
    let db = TestDb::new().await;
    let svc = one_connection(&db).await;
    for id in 1..=3 {
        svc.transaction(async |tx| {
            tx.execute(INSERT, &[&id]).await?;
            assert_eq!(tx.execute(RETURNING, &[&id]).await?, 1);
            // The driver's own execute, the control: it keeps nothing.
            tx.client().execute(DRIVERS, &[&id]).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    }
    assert_eq!(count(&svc).await, 3);
    assert_eq!(kept(&svc, INSERT).await, 1, "one statement for three calls");
    assert_eq!(kept(&svc, RETURNING).await, 0);
    assert_eq!(kept(&svc, DRIVERS).await, 0);

    // Why a statement returning rows is not kept: once a migration adds a column, PostgreSQL
    // refuses to run a kept `RETURNING *` (0A000), where a new one runs. The kept `INSERT`
    // is planned again and goes on working.
    let control = svc
        .transaction(async |tx| Ok::<_, Error>(tx.prepare(RETURNING).await?))
        .await
        .unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE t ADD COLUMN note text")
        .await
        .unwrap();
    let refused = svc
        .transaction(async |tx| Ok::<_, Error>(tx.execute(&control, &[&1]).await?))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    svc.transaction(async |tx| {
        assert_eq!(tx.execute(RETURNING, &[&1]).await?, 1);
        tx.execute(INSERT, &[&4]).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(count(&svc).await, 4);
}

#[tokio::test]
async fn execute_keeps_at_most_max_cached_statements_per_connection() {
    let db = TestDb::new().await;
    let svc = one_connection(&db).await;
    let texts: Vec<String> = (0..svcdb::MAX_CACHED_STATEMENTS + 20)
        .map(|id| format!("INSERT INTO t VALUES ({id}, 0)"))
        .collect();
    svc.transaction(async |tx| {
        for text in &texts {
            tx.execute(text, &[]).await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(count(&svc).await, texts.len() as i64);
    let ours: i64 = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO t VALUES (%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        ours <= svcdb::MAX_CACHED_STATEMENTS as i64,
        "{ours} statements kept"
    );
    assert_eq!(kept(&svc, &texts[0]).await, 1, "the first texts are kept");
    assert_eq!(
        kept(&svc, texts.last().unwrap()).await,
        0,
        "past the cap, not"
    );
}
