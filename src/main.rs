//! The `jitbot` binary: parse the command line, set up logging, run.

#![forbid(unsafe_code)]

use clap::Parser;
use jitbot::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("JITBOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Err(e) = jitbot::cli::main(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
