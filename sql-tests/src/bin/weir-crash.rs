//! `weir-crash [--kills N] [--seed S]`: runs the crash test (`weir_sql_tests::crash`) with N kill points and prints
//! how many runs came back identical to the run that never crashed.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut kills = 100;
    let mut seed = 1;
    let mut kept = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))?;
        match arg.as_str() {
            "--kills" => kills = value.parse()?,
            "--seed" => seed = value.parse()?,
            "--work" => kept = Some(std::path::PathBuf::from(value)),
            other => anyhow::bail!("unknown argument {other}; usage: weir-crash [--kills N] [--seed S] [--work DIR]"),
        }
    }
    let binary = weir_sql_tests::crash::weir_binary()?;
    let temporary = tempfile::tempdir()?;
    let work = kept.unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let started = std::time::Instant::now();
    let report = weir_sql_tests::crash::run(&binary, &work, kills, seed).await?;
    println!(
        "{} of {} crash runs identical to the run without a crash ({:.0} s)",
        report.identical,
        report.runs,
        started.elapsed().as_secs_f64()
    );
    for difference in &report.differences {
        println!("  {difference}");
    }
    Ok(())
}
