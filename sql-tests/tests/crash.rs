//! A few seeded kill points of the crash test (`weir_sql_tests::crash`): the real `weir` binary killed with SIGKILL
//! during ingest, restarted, and every view compared with a run that never crashed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_comes_back_with_every_view_as_if_it_had_never_crashed() {
    let binary = weir_sql_tests::crash::weir_binary().expect("the weir binary (scripts/test.sh builds it first)");
    let work = tempfile::tempdir().unwrap();
    let report = weir_sql_tests::crash::run(&binary, work.path(), 3, 42).await.unwrap();
    assert_eq!(report.identical, report.runs, "{:#?}", report.differences);
}
