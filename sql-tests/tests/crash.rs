//! A few seeded kill points of the crash test (`weir_sql_tests::crash`): the real `weir` binary killed with SIGKILL
//! during ingest, restarted, and every view compared with a run that never crashed; and killed while a client
//! creates tables, coming back with exactly the statements that had been made durable, in order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_comes_back_with_every_view_as_if_it_had_never_crashed() {
    let binary = weir_sql_tests::crash::weir_binary().expect("the weir binary (scripts/test.sh builds it first)");
    let work = tempfile::tempdir().unwrap();
    let report = weir_sql_tests::crash::run(&binary, work.path(), 3, 42).await.unwrap();
    assert_eq!(report.identical, report.runs, "{:#?}", report.differences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_ddl_comes_back_with_a_prefix_of_the_statements() {
    let binary = weir_sql_tests::crash::weir_binary().expect("the weir binary (scripts/test.sh builds it first)");
    let work = tempfile::tempdir().unwrap();
    let mut counts = Vec::new();
    for seed in [3, 11] {
        counts.push(weir_sql_tests::crash::kill_during_ddl(&binary, work.path(), seed).await.unwrap());
    }
    // The kills fell while the tables were being created, not before or after.
    assert!(counts.iter().all(|c| (1..300).contains(c)), "{counts:?}");
}
