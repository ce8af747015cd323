//! The command line: `jitbot run`, `check-config`, `demo`, and the admin
//! commands, which talk to a running jitbot over its admin API (sled lets
//! only one process open the store).

use crate::config::Config;
use crate::http::admin::{LeaseView, RequestView, RevokeBody};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "jitbot",
    version,
    about = "Just-in-time group membership from chat, with leases that always end"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How admin commands reach the running jitbot.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// Base URL of the running jitbot's admin listener (server.admin_listen).
    #[arg(
        long,
        global = true,
        env = "JITBOT_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// The admin token (server.admin_token of the running jitbot).
    #[arg(long, global = true, env = "JITBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run jitbot with a config file.
    Run {
        #[arg(long, short, env = "JITBOT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file (and, for LDAP, bind and check every group).
    CheckConfig {
        #[arg(long, short, env = "JITBOT_CONFIG")]
        config: PathBuf,
        /// Only check the file; do not contact the directory.
        #[arg(long)]
        offline: bool,
    },
    /// The whole flow in a browser: in-memory directory, web chat console, dashboard.
    Demo(crate::demo::DemoArgs),
    /// Leases: list, show, revoke.
    Leases {
        #[command(subcommand)]
        cmd: LeasesCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Requests: list (including break-glass grants awaiting review), cancel.
    Requests {
        #[command(subcommand)]
        cmd: RequestsCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Copy the running jitbot's store to a file.
    Backup {
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Load a backup into a new, empty store directory (jitbot stopped).
    Restore {
        #[arg(long)]
        from: PathBuf,
        /// The new store directory (store.path in the config).
        #[arg(long)]
        data: PathBuf,
        /// How the new store is written (`[store] compression`): `zstd`
        /// (smallest) or `off` (fastest writes).
        #[arg(long, value_enum, default_value_t = crate::store::Compression::Zstd)]
        compression: crate::store::Compression,
    },
    /// Apply the PostgreSQL schema migrations of `[store]` (kind =
    /// "postgres"); `jitbot run` also does at start-up unless `migrate = false`.
    Migrate {
        #[arg(long, short, env = "JITBOT_CONFIG")]
        config: PathBuf,
    },
    /// The store itself (jitbot stopped): copy a sled store into PostgreSQL.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// The audit trail: verify its hash chain, export it for a SIEM.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Copy every tree of a sled store (jitbot stopped) into an empty
    /// PostgreSQL database, then check the copy: counts per tree, the
    /// trees' consistency and the audit chain. The password comes from the
    /// URL's environment: PGPASSWORD; with `sslmode=verify-full` in the
    /// URL, the CA file from PGSSLROOTCERT.
    Copy {
        /// The sled store directory (the old `[store] path`).
        #[arg(long)]
        from: PathBuf,
        /// postgres://user@host:5432/dbname of the new, empty database.
        #[arg(long)]
        to: String,
        /// An env variable holding the `[audit] key`, when the chain is keyed.
        #[arg(long, value_name = "NAME")]
        audit_key_env: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeasesCmd {
    /// Leases that have not ended (`--all` for every lease).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
    },
    Show {
        id: String,
    },
    /// End an active lease now.
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RequestsCmd {
    /// Pending requests and unreviewed break-glass grants (`--all` for every request).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
    },
    Cancel {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check the hash chain; names the first broken record.
    Verify {
        /// An anchor published earlier (`SEQ:HASH`): record SEQ must still
        /// hash to HASH and the chain must continue intact from it.
        #[arg(long)]
        anchor: Option<String>,
        /// Also check the audit archive in DIR (`store.archive_dir`, as the
        /// running jitbot sees it), from record 1 through the store's head.
        #[arg(long, value_name = "DIR")]
        archive: Option<String>,
    },
    /// Publish the chain's head (`SEQ:HASH`) to the alert channel and the
    /// log, and print it: keep it somewhere jitbot cannot write.
    Anchor,
    /// Print the audit trail.
    Export {
        /// RFC 3339 instant, e.g. 2026-01-31T00:00:00Z.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Read archived records from DIR (as the running jitbot sees it);
        /// by default its `store.archive_dir` when `store.retain` is set.
        #[arg(long, value_name = "DIR")]
        archive: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// Exit code for a config that cannot be used (EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

pub fn load_config(path: &std::path::Path) -> Config {
    match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run { config } => {
            let config = load_config(&config);
            let problems = secret_problems(&config);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("  - {p}");
                }
                eprintln!("jitbot cannot start: {} problem(s) with secrets", problems.len());
                std::process::exit(EXIT_BAD_CONFIG);
            }
            match crate::app::run(config).await {
                Err(e) if matches!(e.downcast_ref(), Some(crate::store::StoreError::AuditKey(_))) => {
                    eprintln!("jitbot cannot start: {e}");
                    std::process::exit(EXIT_BAD_CONFIG);
                }
                other => other,
            }
        }
        Cmd::CheckConfig { config, offline } => check_config(&config, offline).await,
        Cmd::Demo(args) => crate::demo::run(args).await,
        Cmd::Leases { cmd, remote } => leases(cmd, &remote).await,
        Cmd::Requests { cmd, remote } => requests(cmd, &remote).await,
        Cmd::Audit { cmd, remote } => audit(cmd, &remote).await,
        Cmd::Backup { to, remote } => {
            let body = Client::new(&remote)?.get_bytes("/admin/backup").await?;
            std::fs::write(&to, &body).with_context(|| format!("cannot write {}", to.display()))?;
            println!("backup written to {} ({} bytes)", to.display(), body.len());
            Ok(())
        }
        Cmd::Migrate { config } => {
            let config = load_config(&config);
            let Some(mut settings) = crate::app::pg_settings(&config.store)? else {
                bail!("store.kind is \"sled\": there is nothing to migrate (sled stores upgrade themselves when opened)");
            };
            settings.migrate = true;
            let applied = tokio::task::spawn_blocking(move || crate::store::pg::migrate(&settings)).await??;
            println!(
                "applied {applied} migration(s); the schema is at version {}",
                crate::store::pg::SCHEMA_VERSION
            );
            Ok(())
        }
        Cmd::Store {
            cmd:
                StoreCmd::Copy {
                    from,
                    to,
                    audit_key_env,
                },
        } => {
            let password = std::env::var("PGPASSWORD")
                .ok()
                .filter(|p| !p.is_empty())
                .map(crate::secret::Secret::new);
            let key = match audit_key_env {
                Some(name) => Some(crate::app::audit_key(&crate::secret::SecretSource::env(&name))?),
                None => None,
            };
            let settings = crate::store::PgSettings {
                url: to,
                password,
                migrate: true,
                // libpq's variable for the CA of sslmode=verify-full.
                ca_file: std::env::var_os("PGSSLROOTCERT").map(std::path::PathBuf::from),
                mirror_compression: crate::store::Compression::default(),
            };
            let report = tokio::task::spawn_blocking(move || {
                crate::store::Store::copy_to_postgres(&from, &settings, key)
            })
            .await??;
            for (tree, n) in &report.counts {
                println!("  {tree}: {n}");
            }
            println!(
                "copied {} keys; the copy verifies: {:?}. Set [store] kind = \"postgres\", url, and a new, empty path",
                report.counts.values().sum::<u64>(),
                report.audit
            );
            Ok(())
        }
        Cmd::Restore {
            from,
            data,
            compression,
        } => {
            let file =
                std::fs::File::open(&from).with_context(|| format!("cannot open {}", from.display()))?;
            let store = crate::store::Store::open_with(&data, 16, compression)?;
            let n = store.restore(std::io::BufReader::new(file)).await?;
            println!(
                "restored {n} records into {} (compression {})",
                data.display(),
                store.compression()
            );
            Ok(())
        }
    }
}

/// Every secret the config names, resolved: what is missing, empty, or (for
/// the admin token) weak, each with its key. `run` refuses to start on any.
pub fn secret_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(src) = &config.server.admin_token {
        if let Err(e) = src.resolve_admin_token() {
            problems.push(format!("server.admin_token: {e}"));
        }
    }
    let secrets = [
        ("ldap.password", config.ldap.as_ref().map(|l| &l.password)),
        ("slack.bot_token", config.slack.as_ref().map(|s| &s.bot_token)),
        (
            "slack.signing_secret",
            config.slack.as_ref().and_then(|s| s.signing_secret.as_ref()),
        ),
        (
            "slack.app_token",
            config.slack.as_ref().and_then(|s| s.app_token.as_ref()),
        ),
        ("discord.bot_token", config.discord.as_ref().map(|d| &d.bot_token)),
    ];
    for (key, src) in secrets {
        if let Some(src) = src {
            if let Err(e) = src.resolve() {
                problems.push(format!("{key}: {e}"));
            }
        }
    }
    if let Some(src) = &config.store.password {
        if let Err(e) = src.resolve() {
            problems.push(format!("store.password: {e}"));
        }
    }
    if let Some(src) = &config.audit.key {
        if let Err(e) = crate::app::audit_key(src) {
            problems.push(format!("{e:#}"));
        }
    }
    problems
}

async fn check_config(path: &std::path::Path, offline: bool) -> anyhow::Result<()> {
    let config = load_config(path);
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    let mut problems = secret_problems(&config);
    if !offline {
        if let Some(ldap) = &config.ldap {
            let groups: Vec<_> = config.group_configs().cloned().collect();
            match crate::directory::ldap::LdapDirectory::new(ldap, &groups) {
                Ok(dir) => problems.extend(dir.check_groups(&groups).await),
                Err(e) => problems.push(format!("ldap: {e}")),
            }
        }
    }
    if config.store.retain.is_some() && !offline {
        if let Err(e) = crate::store::check_archive_dir(&config.store.archive_dir()) {
            problems.push(format!("store.archive_dir: {e}"));
        }
    }
    let postgres = config.store.kind == crate::config::StoreKind::Postgres;
    if (postgres && !offline) || (!postgres && config.store.path.exists()) {
        let opened = match crate::app::pg_settings(&config.store) {
            Ok(Some(settings)) => {
                let path = config.store.path.clone();
                tokio::task::spawn_blocking(move || crate::store::Store::open_postgres(&path, 8, &settings))
                    .await
                    .map_err(|e| crate::store::StoreError::Io(e.to_string()))
                    .and_then(|r| r)
            }
            Ok(None) => crate::store::Store::open(&config.store.path, 8),
            Err(e) => Err(crate::store::StoreError::Io(format!("{e:#}"))),
        };
        match opened {
            Ok(store) => {
                // The check `run` makes before it writes: a keyed chain
                // needs its own key (a key that did not resolve is already
                // a problem above).
                let usable = match config.audit.key.as_ref().map(crate::app::audit_key) {
                    Some(Ok(key)) => {
                        store.set_audit_key(key);
                        true
                    }
                    Some(Err(_)) => false,
                    None => true,
                };
                if usable {
                    if let Err(e) = store.check_audit_key() {
                        problems.push(format!("audit.key: {e}"));
                    }
                }
                match crate::engine::leases_outside_config(&config.policy(), &store) {
                    Ok(notes) => {
                        for note in notes {
                            println!("  note: {note}");
                        }
                    }
                    Err(e) => problems.push(format!("store: {e}")),
                }
            }
            Err(crate::store::StoreError::Locked { .. }) => println!(
                "  note: the store is in use by a running jitbot; its start-up log lists live leases whose group left the config"
            ),
            Err(e) => problems.push(format!("store: {e}")),
        }
    }
    if problems.is_empty() {
        println!("{}: OK ({} groups)", path.display(), config.groups.len());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("  - {p}");
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        std::process::exit(EXIT_BAD_CONFIG);
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(remote: &Remote) -> anyhow::Result<Self> {
        let Some(token) = remote.token.clone() else {
            bail!("set JITBOT_ADMIN_TOKEN (or --token) to the running jitbot's server.admin_token");
        };
        Ok(Client {
            http: reqwest::Client::new(),
            base: remote.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<String> {
        let resp = req.bearer_auth(&self.token).send().await.with_context(|| {
            format!(
                "cannot reach jitbot at {} (is `jitbot run` up? set --url)",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("{status}: {}", body.trim());
        }
        Ok(body)
    }

    async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.get(path).await?.into_bytes())
    }

    async fn get(&self, path: &str) -> anyhow::Result<String> {
        self.call(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> anyhow::Result<String> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

async fn leases(cmd: LeasesCmd, remote: &Remote) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match cmd {
        LeasesCmd::List { json, all } => {
            let body = client.get(&format!("/admin/leases?all={all}")).await?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let leases: Vec<LeaseView> = serde_json::from_str(&body)?;
            println!(
                "{:<10} {:<16} {:<12} {:<14} EXPIRES",
                "LEASE", "GROUP", "USER", "STATE"
            );
            for l in leases {
                println!(
                    "{:<10} {:<16} {:<12} {:<14} {}",
                    l.id, l.group, l.user, l.state, l.expires_at
                );
            }
        }
        LeasesCmd::Show { id } => {
            let body = client.get(&format!("/admin/leases/{id}")).await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        LeasesCmd::Revoke { id, reason } => {
            let body = RevokeBody { reason, by: None };
            print!(
                "{}",
                client.post(&format!("/admin/leases/{id}/revoke"), &body).await?
            );
        }
    }
    Ok(())
}

async fn requests(cmd: RequestsCmd, remote: &Remote) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match cmd {
        RequestsCmd::List { json, all } => {
            let body = client.get(&format!("/admin/requests?all={all}")).await?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let reqs: Vec<RequestView> = serde_json::from_str(&body)?;
            println!(
                "{:<10} {:<16} {:<12} {:<26} REASON",
                "REQUEST", "GROUP", "REQUESTER", "STATE"
            );
            for r in reqs {
                let state = if r.break_glass_unreviewed {
                    "break-glass, unreviewed".to_string()
                } else {
                    r.state
                };
                println!(
                    "{:<10} {:<16} {:<12} {:<26} {}",
                    r.id, r.group, r.requester, state, r.reason
                );
            }
        }
        RequestsCmd::Cancel { id } => {
            print!(
                "{}",
                client.post(&format!("/admin/requests/{id}/cancel"), &()).await?
            );
        }
    }
    Ok(())
}

async fn audit(cmd: AuditCmd, remote: &Remote) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match cmd {
        AuditCmd::Anchor => print!("{}", client.post("/admin/audit/anchor", &()).await?),
        AuditCmd::Verify { anchor, archive } => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            if let Some(a) = anchor {
                let a: crate::store::Anchor = a.parse().map_err(anyhow::Error::msg)?;
                query.append_pair("anchor", &a.to_string());
            }
            if let Some(dir) = &archive {
                query.append_pair("archive", dir);
            }
            let path = format!("/admin/audit/verify?{}", query.finish());
            match client.get(&path).await {
                Ok(body) => print!("{body}"),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
        AuditCmd::Export {
            since,
            format,
            archive,
        } => {
            let format = match format {
                ExportFormat::Jsonl => "jsonl",
                ExportFormat::Csv => "csv",
            };
            let mut path = format!("/admin/audit?format={format}");
            if let Some(since) = since {
                path.push_str(&format!("&since={since}"));
            }
            if let Some(dir) = archive {
                let dir: String = url::form_urlencoded::byte_serialize(dir.as_bytes()).collect();
                path.push_str(&format!("&archive={dir}"));
            }
            print!("{}", client.get(&path).await?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["jitbot", "leases", "list", "--json", "--url", "http://x"]).unwrap();
        assert!(matches!(cli.command, Cmd::Leases { .. }));
    }
}
