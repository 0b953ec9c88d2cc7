//! Runs every sqllogictest file under `sql-tests/slt/`, one test per file, each against its own server.
//!
//! `WEIR_SLT_COMPLETE=1 cargo test -p weir-sql-tests --test slt -- NAME` fills in the expected results of the files
//! whose name contains NAME (check them by hand before committing).

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let complete = std::env::var_os("WEIR_SLT_COMPLETE").is_some_and(|v| v != "0");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    let trials = files
        .into_iter()
        .map(|path| {
            let name = path.strip_prefix(&root).unwrap_or(&path).display().to_string();
            Trial::test(name, move || run(&path, complete))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "slt") {
            files.push(path);
        }
    }
}

fn run(path: &Path, complete: bool) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(weir_sql_tests::run_file(path, complete)).map_err(|e| Failed::from(format!("{e:#}")))
}
