//! `jitbot demo`: the whole flow in a browser (being built).

/// Options of `jitbot demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the console and dashboard listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Keep the store in this directory instead of a temporary one.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("the demo console is not built yet")
}
