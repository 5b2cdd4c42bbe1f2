//! The PostgreSQL harness (`kiln_tests::postgres`) itself: a server the test starts (as a
//! system user when run as root, since `initdb` and `postgres` refuse root), a database per
//! test, and an outage (stop, resume) that keeps the data. The store tests build on it.

use kiln_tests::postgres::PostgresServer;

#[test]
fn the_harness_runs_postgres_15_and_survives_a_restart() {
    let Some(mut server) = PostgresServer::start() else {
        return;
    };
    assert!(
        server
            .psql("postgres", "SHOW server_version")
            .starts_with("15."),
        "not PostgreSQL 15"
    );
    server.create_database("harness");
    server.psql(
        "harness",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (42)",
    );
    server.stop();
    server.resume();
    assert_eq!(server.psql("harness", "SELECT x FROM t"), "42");
    assert!(server
        .url("harness")
        .starts_with("postgres://kiln@127.0.0.1:"));
}
