//! `weir-fuzz [--statements N] [--exchanges N] [--seed S]`: mutated corpus statements and byte-flipped protocol
//! exchanges against a Weir server in this process; prints what it found and fails if anything crashed, hung,
//! panicked or answered an internal error.

use std::path::Path;

fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?.parse()?),
        None => Ok(default),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let statements = flag(&args, "--statements", 10_000)? as usize;
    let exchanges = flag(&args, "--exchanges", 1_000)? as usize;
    let seed = flag(&args, "--seed", 1)?;
    weir_sql_tests::fuzz::count_panics();
    let corpus = weir_sql_tests::fuzz::corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("slt"))?;
    let report = weir_sql_tests::fuzz::run(&corpus, statements, exchanges, seed).await?;
    println!(
        "weir-fuzz seed {seed}: {} statements ({} errors), {} exchanges in {} s: {} crashes, {} hangs, {} panics, {} internal errors",
        report.statements,
        report.errors,
        report.exchanges,
        report.seconds,
        report.crashes,
        report.hangs.len(),
        report.panics,
        report.internal_errors.len()
    );
    for (seconds, sql) in &report.slow {
        println!("  slow ({seconds} s): {sql}");
    }
    for finding in report.hangs.iter().map(|h| format!("hang: {h}")).chain(report.internal_errors.iter().cloned()) {
        println!("  {finding}");
    }
    let clean =
        report.crashes == 0 && report.hangs.is_empty() && report.panics == 0 && report.internal_errors.is_empty();
    anyhow::ensure!(clean, "the fuzzer found problems");
    Ok(())
}
