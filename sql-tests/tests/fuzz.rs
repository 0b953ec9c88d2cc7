//! A short seeded round of the fuzzer (`weir-fuzz` runs long ones): mutated corpus statements and byte-flipped
//! protocol exchanges leave the server up, with no hang, no panic and no internal error.

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_round_finds_nothing() {
    weir_sql_tests::fuzz::count_panics();
    let corpus = weir_sql_tests::fuzz::corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("slt")).unwrap();
    assert!(corpus.len() > 300, "the corpus was not read: {} statements", corpus.len());
    let report = weir_sql_tests::fuzz::run(&corpus, 1_500, 300, 7).await.unwrap();
    assert!(report.errors > 100, "the mutations never reached an error: {report:?}");
    assert_eq!((report.crashes, report.panics), (0, 0), "{report:?}");
    assert!(report.hangs.is_empty(), "{:?}", report.hangs);
    assert!(report.internal_errors.is_empty(), "{:?}", report.internal_errors);
}
