//! Configuration: TOML, unknown keys rejected, validated as a whole before
//! anything is bound or written. Secrets are named (env or file), not written.

use crate::secret::SecretSource;
use jitbot_core::policy::{CardDelivery, GroupPolicy, Policy, Principals};
use jitbot_core::{GroupDn, GroupName, Span, UserId};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    pub directory: DirectoryConfig,
    pub ldap: Option<LdapConfig>,
    pub memory: Option<MemoryDirectoryConfig>,
    pub slack: Option<SlackConfig>,
    pub discord: Option<DiscordConfig>,
    #[serde(default)]
    pub admins: PrincipalsConfig,
    /// Rules for every group at once, and defaults for every `[[group]]`
    /// that does not set its own.
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default, rename = "group")]
    pub groups: Vec<Spanned<GroupConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The public listener: the chat endpoints (`/slack/*`,
    /// `/discord/*`) and a bare `/healthz` and `/readyz`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The admin listener: the admin API, the dashboard, `/metrics` and the
    /// detailed `/readyz`. Keep it on loopback.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API and dashboard; both are off without it.
    pub admin_token: Option<SecretSource>,
    /// Serve the dashboard (behind the admin token).
    #[serde(default)]
    pub dashboard: bool,
    /// Seconds to finish in-flight work after SIGTERM.
    #[serde(default = "default_grace")]
    pub shutdown_grace: Span,
    /// Connections served at once on each listener; more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections from one IP address served at once on each listener;
    /// more from that address are closed on accept.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Longest wait for a request's line and headers (idle keep-alive
    /// connections included) before the connection is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Span,
    /// Longest wait for a request's whole body once its headers are in.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: Span,
    /// Longest time from a request's headers to its response.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Span,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            admin_token: None,
            dashboard: false,
            shutdown_grace: default_grace(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            request_timeout: default_request_timeout(),
        }
    }
}

impl ServerConfig {
    /// The limits both listeners serve with.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_read_timeout: self.header_read_timeout.to_std(),
            body_read_timeout: self.body_read_timeout.to_std(),
            request_timeout: self.request_timeout.to_std(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
/// The admin listener's default address; `jitbot leases` etc. call it.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_grace() -> Span {
    Span::from_secs(20)
}
fn default_max_connections() -> usize {
    512
}
fn default_max_connections_per_ip() -> usize {
    64
}
fn default_header_read_timeout() -> Span {
    Span::from_secs(10)
}
fn default_body_read_timeout() -> Span {
    Span::from_secs(10)
}
fn default_request_timeout() -> Span {
    Span::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where the store's truth is: `"sled"` (the default: the directory at
    /// `path`) or `"postgres"` (the database at `url`; `path` then holds
    /// this replica's mirror of it).
    #[serde(default)]
    pub kind: StoreKind,
    /// Directory of the sled database (with PostgreSQL: the mirror).
    pub path: PathBuf,
    /// With `kind = "postgres"`: `postgres://user@host:5432/dbname`.
    pub url: Option<String>,
    /// With `kind = "postgres"`: the database password, when not in `url`.
    pub password: Option<SecretSource>,
    /// With `kind = "postgres"` and `sslmode=verify-full` in `url`: the PEM
    /// file of the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// With `kind = "postgres"`: apply missing schema migrations at start-up
    /// (else `jitbot migrate` must have).
    #[serde(default = "yes")]
    pub migrate: bool,
    /// sled's page cache, in MiB (sled's own default is 1 GiB).
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// How sled writes a new store's pages: `"zstd"` (the default: about a
    /// quarter of the disk) or `"off"` (the fastest writes: mass
    /// expiries drain ~2.7× faster). Chosen when the store is created; an existing
    /// store keeps its own (see `crate::store::Compression`).
    #[serde(default)]
    pub compression: crate::store::Compression,
    /// How long ended leases, finished requests and audit records stay in
    /// the store (`"400d"`); unset keeps everything forever. Audit records
    /// older than this move to compressed files in `archive_dir`.
    #[serde(default, deserialize_with = "retain_span")]
    pub retain: Option<Span>,
    /// Where audit records older than `retain` are archived; by default
    /// `audit-archive` beside the store directory (`<path>/../audit-archive`).
    pub archive_dir: Option<PathBuf>,
}

/// `[store] kind`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sled,
    Postgres,
}

/// The shortest `[store] retain` accepted.
pub const MIN_RETAIN: Span = Span::from_hours(24);

impl StoreConfig {
    /// The archive directory: `archive_dir`, or `audit-archive` beside the
    /// store directory.
    pub fn archive_dir(&self) -> PathBuf {
        match &self.archive_dir {
            Some(dir) => dir.clone(),
            None => {
                let parent = self.path.parent().unwrap_or_else(|| Path::new("."));
                parent.join("audit-archive")
            }
        }
    }
}

fn retain_span<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Span>, D::Error> {
    let raw = String::deserialize(d)?;
    Span::parse_long(&raw).map(Some).map_err(serde::de::Error::custom)
}

fn default_cache_mb() -> u64 {
    64
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Longest the scheduler sleeps before re-reading the wall clock.
    #[serde(default = "d_max_wait")]
    pub max_wait: Span,
    /// First retry delay after a failed revocation; doubles each time.
    #[serde(default = "d_retry_base")]
    pub retry_base: Span,
    /// Longest delay between retries.
    #[serde(default = "d_retry_max")]
    pub retry_max: Span,
    /// Failed attempts before the alert channel hears of it.
    #[serde(default = "d_alert_after")]
    pub alert_after: u32,
    /// How often ZSP groups are checked for members without a lease.
    #[serde(default = "d_zsp_interval")]
    pub zsp_interval: Span,
    /// Directory operations run at once while draining expiries.
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
}

fn d_max_wait() -> Span {
    Span::from_secs(60)
}
fn d_retry_base() -> Span {
    Span::from_secs(5)
}
fn d_retry_max() -> Span {
    Span::from_mins(5)
}
fn d_alert_after() -> u32 {
    5
}
fn d_zsp_interval() -> Span {
    Span::from_mins(5)
}
fn d_concurrency() -> usize {
    32
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_wait: d_max_wait(),
            retry_base: d_retry_base(),
            retry_max: d_retry_max(),
            alert_after: d_alert_after(),
            zsp_interval: d_zsp_interval(),
            concurrency: d_concurrency(),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryKind {
    Ldap,
    Memory,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// `ldap` for production, `memory` for tests and the demo.
    pub kind: DirectoryKind,
}

/// How a group lists its members.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
pub enum MembershipKind {
    /// `member` with DNs (groupOfNames, Active Directory).
    #[default]
    #[serde(rename = "member")]
    Member,
    /// `uniqueMember` with DNs (groupOfUniqueNames).
    #[serde(rename = "uniqueMember")]
    UniqueMember,
    /// `memberUid` with the user id (posixGroup).
    #[serde(rename = "memberUid")]
    MemberUid,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:389` or `ldaps://host:636`.
    pub url: String,
    /// Upgrade `ldap://` with StartTLS.
    #[serde(default)]
    pub starttls: bool,
    /// PEM file of the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Check the certificate's host name (never turn off in production);
    /// turning it off needs `ca_file`, so only that CA's certificates pass.
    #[serde(default = "yes")]
    pub verify_hostname: bool,
    /// Accept `ldap://` without StartTLS, which sends the bind password in
    /// clear: for a directory on the same host or in tests only.
    #[serde(default)]
    pub allow_plaintext_bind: bool,
    pub bind_dn: String,
    pub password: SecretSource,
    /// Where user entries live.
    pub user_base: String,
    /// The attribute whose value is the jitbot user id (`uid`, `sAMAccountName`).
    #[serde(default = "d_user_id_attr")]
    pub user_id_attribute: String,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Span,
    #[serde(default = "d_op_timeout")]
    pub operation_timeout: Span,
    /// How deep to follow nested groups on OpenLDAP.
    #[serde(default = "d_nested_depth")]
    pub nested_depth: u32,
    /// Use Active Directory's in-chain matching rule for nested groups.
    #[serde(default)]
    pub active_directory: bool,
    /// A DN kept in groupOfNames groups so they are never empty (OpenLDAP
    /// refuses an empty groupOfNames); not counted as a member.
    pub placeholder_dn: Option<String>,
}

fn yes() -> bool {
    true
}
fn d_user_id_attr() -> String {
    "uid".into()
}
fn d_connect_timeout() -> Span {
    Span::from_secs(5)
}
fn d_op_timeout() -> Span {
    Span::from_secs(10)
}
fn d_nested_depth() -> u32 {
    3
}

/// The in-memory directory, seeded from config: for tests and the demo.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MemoryDirectoryConfig {
    #[serde(default, rename = "user")]
    pub users: Vec<MemoryUser>,
    /// Group DN → initial member ids.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MemoryUser {
    pub id: String,
    /// Other attributes, e.g. `mail`, used to map chat identities.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SlackMode {
    #[default]
    Socket,
    Http,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    #[serde(default)]
    pub mode: SlackMode,
    /// `xoxb-` bot token.
    pub bot_token: SecretSource,
    /// Signing secret; required in HTTP mode.
    pub signing_secret: Option<SecretSource>,
    /// `xapp-` app-level token; required in Socket Mode.
    pub app_token: Option<SecretSource>,
    /// The workspace jitbot serves (`T…`); payloads from any other are refused.
    #[serde(default)]
    pub team_id: String,
    /// The Slack app's id (`A…`); when set, payloads for another app are refused.
    pub app_id: Option<String>,
    /// The Enterprise Grid org (`E…`); when set, payloads naming another are refused.
    pub enterprise_id: Option<String>,
    #[serde(default = "d_slack_api")]
    pub api_url: String,
    /// Directory attribute holding a Slack user's email.
    #[serde(default = "d_mail")]
    pub user_attribute: String,
    /// Channel for approval cards and notices of groups with no channel of their own.
    pub default_channel: String,
    /// Channel for security alerts (break-glass, drift, stuck revocations).
    pub alert_channel: Option<String>,
    /// Group name → channel id.
    #[serde(default)]
    pub channels: BTreeMap<String, String>,
}

fn d_slack_api() -> String {
    "https://slack.com/api".into()
}
/// Discord's own REST API base, without the `/api/v10` that serenity adds.
pub const DISCORD_API: &str = "https://discord.com";

fn d_discord_api() -> String {
    DISCORD_API.into()
}
fn d_mail() -> String {
    "mail".into()
}

/// How Discord delivers interactions to jitbot.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscordMode {
    /// A bot connection to Discord's gateway: no public endpoint needed.
    #[default]
    Gateway,
    /// Discord POSTs to `/discord/interactions` (needs `public_key`).
    Http,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiscordConfig {
    /// `gateway` (default) or `http` (the interactions endpoint).
    #[serde(default)]
    pub mode: DiscordMode,
    pub bot_token: SecretSource,
    /// Base of Discord's REST API (jitbot calls `{api_url}/api/v10/...` and
    /// asks `GET /api/v10/gateway/bot` there for the gateway URL). Anything
    /// but the default is treated as a rate-limiting proxy: serenity's own
    /// rate limiter is turned off, since it ignores a proxy otherwise.
    #[serde(default = "d_discord_api")]
    pub api_url: String,
    /// The application's Ed25519 public key (hex), for the interactions endpoint.
    pub public_key: Option<String>,
    pub application_id: String,
    /// Register `/jit` in this guild only (instant); globally when absent.
    pub guild_id: Option<String>,
    pub default_channel: String,
    pub alert_channel: Option<String>,
    #[serde(default)]
    pub channels: BTreeMap<String, String>,
    /// Directory attribute holding a Discord user id.
    pub user_attribute: Option<String>,
    /// Static map, Discord user id → directory user id.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
}

/// The audit chain's protection against someone with write access to the store.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// HMAC-SHA256 key for the chain (env or file, at least 32 bytes): with
    /// it, write access to the store alone cannot forge history.
    pub key: Option<SecretSource>,
    /// Publish the chain's head to the alert channel and the log this often
    /// (and at start-up).
    pub anchor_every: Option<Span>,
    /// A file outside the store that every published anchor is appended to
    /// (`SEQ:HASH` a line); start-up and `jitbot audit verify` check the
    /// chain against its last line, which catches a rollback of the chain.
    pub anchor_file: Option<std::path::PathBuf>,
}

/// The shortest `[audit] key` accepted, in bytes.
pub const MIN_AUDIT_KEY_BYTES: usize = 32;

/// Rules for every group at once.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Requests one person may have waiting for a decision at once; more are
    /// refused (the requester is told how to cancel old ones).
    #[serde(default = "d_max_pending")]
    pub max_pending_per_user: usize,
    /// Where approval cards go unless a group says: `channel` (default),
    /// `dm` or `both`.
    #[serde(default)]
    pub approval_cards: CardDelivery,
}

fn d_max_pending() -> usize {
    5
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_pending_per_user: d_max_pending(),
            approval_cards: CardDelivery::default(),
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PrincipalsConfig {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

impl PrincipalsConfig {
    fn to_principals(&self) -> Principals {
        Principals {
            users: self.users.iter().map(UserId::new).collect(),
            groups: self.groups.iter().map(GroupDn::new).collect(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub dn: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub membership: MembershipKind,
    pub requesters: PrincipalsConfig,
    #[serde(default)]
    pub approvers: PrincipalsConfig,
    #[serde(default = "one")]
    pub approvals_required: u32,
    pub default_duration: Span,
    pub max_duration: Span,
    pub max_total_duration: Option<Span>,
    #[serde(default = "yes")]
    pub reason_required: bool,
    #[serde(default)]
    pub zsp: bool,
    #[serde(default)]
    pub remediate: bool,
    #[serde(default = "d_approval_timeout")]
    pub approval_timeout: Span,
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default)]
    pub auto_approve_for: PrincipalsConfig,
    #[serde(default)]
    pub break_glass: bool,
    #[serde(default = "yes")]
    pub deny_ends_request: bool,
    #[serde(default)]
    pub extension_requires_approval: bool,
    pub expiry_warning: Option<Span>,
    /// Also write Active Directory's `<TTL=...>` temporary membership.
    #[serde(default)]
    pub ad_ttl: bool,
    /// Where this group's approval cards go; `[policy] approval_cards` when absent.
    pub approval_cards: Option<CardDelivery>,
}

fn one() -> u32 {
    1
}
fn d_approval_timeout() -> Span {
    Span::from_mins(30)
}

impl GroupConfig {
    pub fn to_policy(&self) -> GroupPolicy {
        GroupPolicy {
            name: GroupName::new(&self.name),
            dn: GroupDn::new(&self.dn),
            description: self.description.clone(),
            requesters: self.requesters.to_principals(),
            approvers: self.approvers.to_principals(),
            approvals_required: self.approvals_required,
            default_duration: self.default_duration,
            max_duration: self.max_duration,
            max_total_duration: self.max_total_duration.unwrap_or(self.max_duration),
            reason_required: self.reason_required,
            zsp: self.zsp,
            remediate: self.remediate,
            approval_timeout: self.approval_timeout,
            auto_approve: self.auto_approve,
            auto_approve_for: self.auto_approve_for.to_principals(),
            break_glass: self.break_glass,
            deny_ends_request: self.deny_ends_request,
            extension_requires_approval: self.extension_requires_approval,
            expiry_warning: self.expiry_warning,
            approval_cards: self.approval_cards.unwrap_or_default(),
        }
    }
}

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// A config that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{} has {} problem(s):\n{}", .file, .issues.len(), .issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub file: String,
    pub issues: Vec<ConfigIssue>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key written on the line at `offset` (`max_duration = "1000y"` →
/// `max_duration`), so a value the parser refuses is named, not just placed.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    if !text.is_char_boundary(offset) {
        return None;
    }
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    bare.then(|| key.to_string())
}

/// The line of `key = …` in the `[section]` table, or of the table's header
/// when the key is not written (a default): for keys deserialized without
/// their spans.
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let header = format!("[{section}]");
    let mut header_line = None;
    let mut inside = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            inside = line == header;
            if inside {
                header_line = Some(n + 1);
            }
        } else if inside && line.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            return Some(n + 1);
        }
    }
    header_line
}

/// Checks a Discord application public key: 64 hex digits of an Ed25519
/// key that is not weak. A small-order key lets forged signatures verify
/// (with the all-zero key, about one timestamp in four).
pub fn discord_public_key(hex_key: &str) -> Result<[u8; 32], String> {
    let where_ = "copy it from the Discord Developer Portal, General Information → Public Key";
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("`{hex_key}` is not an Ed25519 public key (64 hex digits); {where_}"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| format!("is not a valid Ed25519 public key; {where_}"))?;
    if key.is_weak() {
        return Err(format!(
            "is a weak (small-order) Ed25519 key, which lets forged signatures verify; \
             it cannot be Discord's; {where_}"
        ));
    }
    Ok(bytes)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            issues: vec![ConfigIssue {
                key: "(file)".into(),
                line: None,
                message: format!("cannot read it: {e}"),
            }],
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            issues: vec![ConfigIssue {
                key: e
                    .span()
                    .and_then(|s| key_at(text, s.start))
                    .unwrap_or_else(|| "(syntax)".into()),
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().trim().to_string(),
            }],
        })?;
        let issues = config.validate(text);
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: file.to_string(),
                issues,
            })
        }
    }

    fn validate(&self, text: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut issue = |key: String, line: Option<usize>, message: String| {
            issues.push(ConfigIssue { key, line, message })
        };
        match self.directory.kind {
            DirectoryKind::Ldap if self.ldap.is_none() => issue(
                "directory.kind".into(),
                None,
                "is `ldap` but there is no [ldap] section".into(),
            ),
            DirectoryKind::Memory if self.memory.is_none() => issue(
                "directory.kind".into(),
                None,
                "is `memory` but there is no [memory] section".into(),
            ),
            _ => {}
        }
        if let Some(ldap) = &self.ldap {
            if !(ldap.url.starts_with("ldap://") || ldap.url.starts_with("ldaps://")) {
                issue(
                    "ldap.url".into(),
                    None,
                    "must start with ldap:// or ldaps://".into(),
                );
            }
            if ldap.starttls && ldap.url.starts_with("ldaps://") {
                issue(
                    "ldap.starttls".into(),
                    None,
                    "StartTLS makes no sense on ldaps://".into(),
                );
            }
            if ldap.bind_dn.trim().is_empty() {
                issue(
                    "ldap.bind_dn".into(),
                    key_line(text, "ldap", "bind_dn"),
                    "an empty bind DN makes the bind anonymous (and some servers accept it \
                     whatever the password); write the service account's DN"
                        .into(),
                );
            }
            if ldap.url.starts_with("ldap://") && !ldap.starttls && !ldap.allow_plaintext_bind {
                issue(
                    "ldap.url".into(),
                    key_line(text, "ldap", "url"),
                    "ldap:// without StartTLS sends the bind password in clear; use ldaps://, \
                     or set starttls = true, or (for a directory on this host only) write \
                     allow_plaintext_bind = true"
                        .into(),
                );
            }
            if !ldap.verify_hostname && ldap.ca_file.is_none() {
                issue(
                    "ldap.verify_hostname".into(),
                    key_line(text, "ldap", "verify_hostname"),
                    "= false without ca_file accepts any publicly trusted certificate for any \
                     host; set ca_file to the CA that signed the directory's certificate, or \
                     leave verify_hostname on"
                        .into(),
                );
            }
        }
        if let Some(slack) = &self.slack {
            match slack.mode {
                SlackMode::Http if slack.signing_secret.is_none() => issue(
                    "slack.signing_secret".into(),
                    None,
                    "HTTP mode needs the signing secret to verify requests".into(),
                ),
                SlackMode::Socket if slack.app_token.is_none() => issue(
                    "slack.app_token".into(),
                    None,
                    "Socket Mode needs an xapp- app-level token".into(),
                ),
                _ => {}
            }
            // Required in both modes: a signing secret or app token proves
            // the payload came from Slack for this app, not from which
            // workspace (an app can be installed in several).
            if !slack.team_id.trim().starts_with('T') {
                issue(
                    "slack.team_id".into(),
                    None,
                    "is required: the id (T…) of the one workspace jitbot serves; payloads from any other are refused. \
                     Find it in the workspace's URL (app.slack.com/client/T…) or with auth.test"
                        .into(),
                );
            }
        }
        if let Some(discord) = &self.discord {
            if discord.mode == DiscordMode::Http && discord.public_key.is_none() {
                issue(
                    "discord.public_key".into(),
                    None,
                    "HTTP interactions mode needs the application's public key (hex)".into(),
                );
            }
            let base = discord.api_url.trim_end_matches('/');
            let scheme_ok = base.starts_with("https://") || base.starts_with("http://");
            if !scheme_ok || base.ends_with("/api") || base.contains("/api/") {
                issue(
                    "discord.api_url".into(),
                    None,
                    format!(
                        "`{}` must be a base such as {DISCORD_API} or http://proxy:3000, \
                         without the /api/v10 that jitbot adds",
                        discord.api_url
                    ),
                );
            }
            if let Some(Err(why)) = discord.public_key.as_deref().map(discord_public_key) {
                issue(
                    "discord.public_key".into(),
                    key_line(text, "discord", "public_key"),
                    why,
                );
            }
        }
        let server = &self.server;
        if server.admin_listen == server.listen && server.listen.port() != 0 {
            issue(
                "server.admin_listen".into(),
                key_line(text, "server", "admin_listen"),
                format!(
                    "is the same address as server.listen ({}); the admin API needs its own, \
                     on loopback (default {DEFAULT_ADMIN_LISTEN})",
                    server.listen
                ),
            );
        }
        if server.max_connections == 0 {
            issue(
                "server.max_connections".into(),
                key_line(text, "server", "max_connections"),
                "must be at least 1".into(),
            );
        }
        if server.max_connections_per_ip == 0 {
            issue(
                "server.max_connections_per_ip".into(),
                key_line(text, "server", "max_connections_per_ip"),
                "must be at least 1".into(),
            );
        }
        if self.server.dashboard && self.server.admin_token.is_none() {
            issue(
                "server.dashboard".into(),
                None,
                "the dashboard is served only behind server.admin_token; set one".into(),
            );
        }
        if let Some(retain) = self.store.retain.filter(|r| *r < MIN_RETAIN) {
            issue(
                "store.retain".into(),
                key_line(text, "store", "retain"),
                format!(
                    "= \"{retain}\" is shorter than a day: records would be pruned before anyone reviews \
                     yesterday's access, and an approval card or notice still being retried could lose its \
                     request; use at least \"1d\" (a year or more is usual), or leave it unset to keep everything"
                ),
            );
        }
        match (self.store.kind, &self.store.url) {
            (StoreKind::Postgres, None) => issue(
                "store.url".into(),
                key_line(text, "store", "kind"),
                "is missing: kind = \"postgres\" needs url = \"postgres://user@host:5432/dbname\"".into(),
            ),
            (StoreKind::Sled, Some(_)) => issue(
                "store.url".into(),
                key_line(text, "store", "url"),
                "is set but store.kind is \"sled\"; set kind = \"postgres\" to use the database, or remove url".into(),
            ),
            _ => {}
        }
        if self.store.kind == StoreKind::Sled && self.store.password.is_some() {
            issue(
                "store.password".into(),
                key_line(text, "store", "password"),
                "is set but store.kind is \"sled\"; remove it, or set kind = \"postgres\"".into(),
            );
        }
        if let Some(url) = &self.store.url {
            // Read as the driver reads them: a check of the first `sslmode`
            // while the driver applies the last would pass a downgrade.
            let params = crate::store::pg_tls::parameters(url);
            let repeated = params
                .iter()
                .enumerate()
                .find(|(i, p)| params[..*i].iter().any(|q| q.key.eq_ignore_ascii_case(&p.key)))
                .map(|(_, p)| p.key.clone());
            let sslmode = params
                .iter()
                .find(|p| p.key.eq_ignore_ascii_case("sslmode"))
                .map(|p| p.value.to_ascii_lowercase());
            let verify_full = sslmode.as_deref() == Some("verify-full");
            if let Some(key) = repeated {
                issue(
                    "store.url".into(),
                    key_line(text, "store", "url"),
                    format!(
                        "gives the connection parameter `{key}` more than once; the PostgreSQL driver would use \
                         the last one, so which TLS mode or server applies would depend on the order. Give each \
                         parameter once"
                    ),
                );
            } else if matches!(sslmode.as_deref(), Some("require" | "verify-ca")) {
                issue(
                    "store.url".into(),
                    key_line(text, "store", "url"),
                    "asks for TLS that does not check the certificate names the server (sslmode=require or \
                     verify-ca); use sslmode=verify-full with store.ca_file set to the CA that signed the \
                     server's certificate"
                        .into(),
                );
            } else if verify_full && self.store.ca_file.is_none() {
                issue(
                    "store.url".into(),
                    key_line(text, "store", "url"),
                    "asks for sslmode=verify-full but store.ca_file is not set; set it to the PEM file of the CA \
                     that signed the PostgreSQL server's certificate"
                        .into(),
                );
            } else if !verify_full && self.store.ca_file.is_some() {
                issue(
                    "store.ca_file".into(),
                    key_line(text, "store", "ca_file"),
                    "is set but store.url does not ask for sslmode=verify-full; add ?sslmode=verify-full to the \
                     url, or remove ca_file"
                        .into(),
                );
            } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                issue(
                    "store.url".into(),
                    key_line(text, "store", "url"),
                    "must be a postgres:// URL, e.g. postgres://jitbot@db.internal:5432/jitbot".into(),
                );
            }
            let (before_query, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
            let userinfo = before_query.rsplit_once('@').map(|(u, _)| u).unwrap_or("");
            // The driver, like libpq, also takes `?password=…`.
            let in_query = query.split('&').any(|pair| {
                pair.split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("password")
            }) || params
                .iter()
                .any(|p| p.key.trim().eq_ignore_ascii_case("password"));
            if userinfo.matches(':').count() > 1 || in_query {
                issue(
                    "store.url".into(),
                    key_line(text, "store", "url"),
                    "holds a password; put it in store.password = { env = \"…\" } or { file = \"…\" } instead".into(),
                );
            }
        }
        if self.store.kind == StoreKind::Postgres && self.store.retain.is_some() {
            // The mirror's directory is each replica's own (an emptyDir, a
            // local disk), and so is the default archive beside it.
            let mirror = &self.store.path;
            let beside = mirror
                .parent()
                .map_or_else(|| PathBuf::from("audit-archive"), |p| p.join("audit-archive"));
            match &self.store.archive_dir {
                None => issue(
                    "store.archive_dir".into(),
                    key_line(text, "store", "retain"),
                    "must be set when kind = \"postgres\" and retain is: archived audit records leave the database, \
                     so they must go to a directory every replica mounts (a shared volume), not beside one replica's \
                     mirror (store.path). Set archive_dir to that shared directory"
                        .into(),
                ),
                Some(dir) if dir.starts_with(mirror) || *dir == beside => issue(
                    "store.archive_dir".into(),
                    key_line(text, "store", "archive_dir"),
                    format!(
                        "= \"{}\" is {} this replica's own mirror ({}): with kind = \"postgres\" archived audit \
                         records leave the database, so they must go to a volume every replica mounts, not to one \
                         replica's disk. Mount a shared volume and point archive_dir at it",
                        dir.display(),
                        if dir.starts_with(mirror) { "inside" } else { "the default place beside" },
                        mirror.display()
                    ),
                ),
                Some(_) => {}
            }
        }
        if self.store.archive_dir.is_some() && self.store.retain.is_none() {
            issue(
                "store.archive_dir".into(),
                key_line(text, "store", "archive_dir"),
                "is set but store.retain is not, so nothing would be archived; set retain too, or remove archive_dir".into(),
            );
        }
        if let Some(every) = self.audit.anchor_every {
            if every < Span::from_mins(1) {
                issue(
                    "audit.anchor_every".into(),
                    None,
                    "must be at least 1m; anchors are for people to keep, not a log stream".into(),
                );
            }
        }
        if self.policy.max_pending_per_user == 0 {
            issue(
                "policy.max_pending_per_user".into(),
                None,
                "must be at least 1, or nobody could ask for anything".into(),
            );
        }
        if self.scheduler.concurrency == 0 {
            issue("scheduler.concurrency".into(), None, "must be at least 1".into());
        }
        if self.groups.is_empty() {
            issue(
                "group".into(),
                None,
                "no [[group]] is configured; jitbot would manage nothing".into(),
            );
        }
        let mut names = BTreeSet::new();
        // Two groups on one directory group would share one membership
        // under two leases: one would remove what the other holds.
        let mut dns = std::collections::BTreeMap::new();
        for spanned in &self.groups {
            let g = spanned.get_ref();
            let line = Some(line_of(text, spanned.span().start));
            let key = |k: &str| format!("group[{}].{k}", g.name);
            if !names.insert(g.name.clone()) {
                issue(key("name"), line, "is used by two groups".into());
            }
            if jitbot_core::Command::parse(&format!("release {}", g.name)).is_err() {
                issue(
                    key("name"),
                    line,
                    "use letters, digits, `-`, `_` or `.` only".into(),
                );
            }
            if !g.dn.contains('=') {
                issue(key("dn"), line, format!("`{}` is not a distinguished name", g.dn));
            }
            let dn = crate::directory::ldap::dn::normalize(&g.dn);
            if let Some(first) = dns.insert(dn, g.name.clone()) {
                issue(
                    key("dn"),
                    line,
                    format!(
                        "names the same directory group as group `{first}`; \
                         give each directory group one [[group]] entry"
                    ),
                );
            }
            if g.requesters.users.is_empty() && g.requesters.groups.is_empty() {
                issue(key("requesters"), line, "nobody may request this group".into());
            }
            let needs_approvers = !g.auto_approve;
            if needs_approvers && g.approvers.users.is_empty() && g.approvers.groups.is_empty() {
                issue(
                    key("approvers"),
                    line,
                    "nobody can approve; add approvers or set auto_approve".into(),
                );
            }
            if g.approvals_required == 0 {
                issue(
                    key("approvals_required"),
                    line,
                    "must be at least 1 (use auto_approve for none)".into(),
                );
            }
            if g.approvals_required as usize > g.approvers.users.len() && g.approvers.groups.is_empty() {
                issue(
                    key("approvals_required"),
                    line,
                    format!(
                        "needs {} approvers but only {} are named",
                        g.approvals_required,
                        g.approvers.users.len()
                    ),
                );
            }
            if g.default_duration > g.max_duration {
                issue(
                    key("default_duration"),
                    line,
                    format!(
                        "{} is longer than max_duration {}",
                        g.default_duration, g.max_duration
                    ),
                );
            }
            if let Some(total) = g.max_total_duration {
                if total < g.max_duration {
                    issue(
                        key("max_total_duration"),
                        line,
                        format!("{total} is shorter than max_duration {}", g.max_duration),
                    );
                }
            }
            if g.remediate && !g.zsp {
                issue(
                    key("remediate"),
                    line,
                    "only applies to zsp groups; set zsp = true".into(),
                );
            }
            if let Some(w) = g.expiry_warning {
                if w >= g.max_duration {
                    issue(
                        key("expiry_warning"),
                        line,
                        "must be shorter than max_duration".into(),
                    );
                }
            }
        }
        issues
    }

    /// Settings that are allowed but weaken jitbot, worded for the log at
    /// start-up and for `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(ldap) = &self.ldap {
            if ldap.url.starts_with("ldap://") && !ldap.starttls && ldap.allow_plaintext_bind {
                out.push(format!(
                    "ldap.allow_plaintext_bind: the bind password goes to {} in clear; \
                     use ldaps:// or starttls = true unless the directory is on this host",
                    ldap.url
                ));
            }
        }
        if !self.server.admin_listen.ip().is_loopback() {
            out.push(format!(
                "server.admin_listen: {} is not a loopback address; the admin API, \
                 dashboard and metrics are reachable from the network (behind the admin token)",
                self.server.admin_listen
            ));
        }
        let dm_groups: Vec<String> = self
            .policy()
            .groups
            .iter()
            .filter(|g| g.approval_cards.dms())
            .map(|g| g.name.to_string())
            .collect();
        if let Some(d) = &self.discord {
            if !dm_groups.is_empty() && d.user_attribute.is_none() && d.users.is_empty() {
                out.push(format!(
                    "approval_cards: groups {} send cards by DM, but discord.user_attribute and                      discord.users are both empty, so jitbot cannot find approvers on Discord                      (their cards go to the channel); set one of them",
                    dm_groups.join(", ")
                ));
            }
        }
        out
    }

    pub fn policy(&self) -> Policy {
        Policy {
            groups: self
                .groups
                .iter()
                .map(|g| {
                    let mut p = g.get_ref().to_policy();
                    p.approval_cards = g.get_ref().approval_cards.unwrap_or(self.policy.approval_cards);
                    p
                })
                .collect(),
            admins: self.admins.to_principals(),
        }
    }

    pub fn group_configs(&self) -> impl Iterator<Item = &GroupConfig> {
        self.groups.iter().map(|g| g.get_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[store]
path = "/tmp/x"

[directory]
kind = "memory"

[memory]

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = { users = ["alice"] }
approvers = { users = ["bob"] }
default_duration = "1h"
max_duration = "4h"
"#;

    #[test]
    fn minimal_config_loads() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        let p = c.policy();
        assert_eq!(p.groups[0].max_total_duration, Span::from_hours(4));
        assert_eq!(c.store.cache_mb, 64);
    }

    #[test]
    fn store_compression_is_zstd_unless_turned_off_and_a_typo_names_the_choices() {
        use crate::store::Compression;
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.store.compression, Compression::Zstd);
        let with = |v: &str| {
            MINIMAL.replace(
                "path = \"/tmp/x\"",
                &format!("path = \"/tmp/x\"\ncompression = \"{v}\""),
            )
        };
        let off = Config::parse(&with("off"), "t.toml").unwrap();
        assert_eq!(off.store.compression, Compression::Off);
        let err = Config::parse(&with("lz4"), "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("compression") && err.contains("zstd") && err.contains("off"),
            "{err}"
        );
    }

    #[test]
    fn store_kind_postgres_needs_a_url_and_refuses_tls_and_passwords_in_it() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.store.kind, StoreKind::Sled, "sled is the default");
        let pg = |extra: &str| MINIMAL.replace("path = \"/tmp/x\"", &format!("path = \"/tmp/x\"\n{extra}"));
        let ok = Config::parse(
            &pg("kind = \"postgres\"\nurl = \"postgres://jitbot@db:5432/jitbot\"\npassword = { env = \"PGPW\" }"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(ok.store.kind, StoreKind::Postgres);
        assert!(ok.store.migrate, "migrations run at start-up by default");
        let tls = Config::parse(
            &pg("kind = \"postgres\"\nurl = \"postgres://jitbot@db:5432/jitbot?sslmode=verify-full\"\nca_file = \"/etc/jitbot/pg-ca.pem\""),
            "t.toml",
        )
        .unwrap();
        assert_eq!(tls.store.ca_file, Some(PathBuf::from("/etc/jitbot/pg-ca.pem")));
        for (extra, want) in [
            ("kind = \"postgres\"", "needs url"),
            ("url = \"postgres://db/jitbot\"", "kind = \"postgres\""),
            (
                "kind = \"postgres\"\nurl = \"postgres://db/jitbot?sslmode=verify-full\"",
                "sslmode",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://db/jitbot?sslmode=require\"\nca_file = \"/ca.pem\"",
                "verify-full",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://db/jitbot\"\nca_file = \"/ca.pem\"",
                "store.ca_file",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u:pw@db/jitbot\"",
                "store.password",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u@db/jitbot?application_name=x&password=pw\"",
                "store.password",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u@db/jitbot?Password=pw\"",
                "store.password",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://db/jitbot?sslmode=verify-full&sslmode=disable\"\nca_file = \"/ca.pem\"",
                "`sslmode` more than once",
            ),
            ("kind = \"mysql\"", "unknown variant"),
        ] {
            let err = Config::parse(&pg(extra), "t.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn store_retain_takes_long_spans_refuses_less_than_a_day_and_archives_beside_the_store() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.store.retain, None, "unset keeps everything");
        let with =
            |extra: &str| MINIMAL.replace("path = \"/tmp/x\"", &format!("path = \"/tmp/x/db\"\n{extra}"));
        let c = Config::parse(&with("retain = \"400d\""), "t.toml").unwrap();
        assert_eq!(c.store.retain, Some(Span::from_secs(400 * 86_400)));
        assert_eq!(c.store.archive_dir(), PathBuf::from("/tmp/x/audit-archive"));
        let c = Config::parse(&with("retain = \"2y\"\narchive_dir = \"/srv/audit\""), "t.toml").unwrap();
        assert_eq!(c.store.archive_dir(), PathBuf::from("/srv/audit"));
        let err = Config::parse(&with("retain = \"12h\""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.retain") && err.contains("shorter than a day"),
            "{err}"
        );
        let err = Config::parse(&with("retain = \"forever\""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");
        let err = Config::parse(&with("archive_dir = \"/srv/audit\""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.archive_dir") && err.contains("retain"),
            "{err}"
        );
    }

    #[test]
    fn approval_cards_default_to_the_channel_and_policy_sets_the_default() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.policy().groups[0].approval_cards, CardDelivery::Channel);
        let text = MINIMAL.replace("[memory]", "[policy]\napproval_cards = \"dm\"\n\n[memory]");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.policy().groups[0].approval_cards, CardDelivery::Dm);
        let text = format!("{text}approval_cards = \"both\"\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(
            c.policy().groups[0].approval_cards,
            CardDelivery::Both,
            "a group's own setting wins"
        );
        assert!(
            c.warnings().is_empty(),
            "no Discord configured: {:?}",
            c.warnings()
        );
        let with_discord = format!(
            "[discord]\nbot_token = {{ env = \"T\" }}\napplication_id = \"1\"\ndefault_channel = \"2\"\n{text}"
        );
        let c = Config::parse(&with_discord, "t.toml").unwrap();
        assert!(
            c.warnings().iter().any(|w| w.contains("discord.user_attribute")),
            "{:?}",
            c.warnings()
        );
        let bad = MINIMAL.replace("[memory]", "[policy]\napproval_cards = \"email\"\n\n[memory]");
        let err = Config::parse(&bad, "t.toml").unwrap_err();
        assert!(err.to_string().contains("`channel`, `dm`, `both`"), "{err}");
        assert_eq!(err.issues[0].line, Some(9), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jitbot.example.toml");
        if let Err(e) = Config::load(&path) {
            panic!("{e}");
        }
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let text = MINIMAL.replace(
            "max_duration = \"4h\"",
            "max_duration = \"4h\"\nmax_durration = \"9h\"",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(err.issues[0].line, Some(17), "{err}");
        assert!(err.to_string().contains("max_durration"), "{err}");
    }

    #[test]
    fn semantic_problems_name_key_and_line() {
        let text = MINIMAL.replace("default_duration = \"1h\"", "default_duration = \"9h\"");
        let err = Config::parse(&text, "t.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("group[db-admins].default_duration"), "{msg}");
        assert_eq!(err.issues[0].line, Some(10), "{msg}");
    }

    fn ldap(extra: &str) -> String {
        MINIMAL.replace("kind = \"memory\"", "kind = \"ldap\"").replace(
            "[memory]\n",
            &format!(
                "[ldap]\nurl = \"ldap://ldap.example.org\"\nbind_dn = \"cn=jitbot,dc=example,dc=org\"\n\
                 password = {{ env = \"PW\" }}\nuser_base = \"ou=people,dc=example,dc=org\"\n{extra}\n"
            ),
        )
    }

    #[test]
    fn a_plaintext_bind_is_refused_unless_allowed_with_a_warning() {
        let err = Config::parse(&ldap(""), "t.toml").unwrap_err();
        let issue = &err.issues[0];
        assert_eq!((issue.key.as_str(), issue.line), ("ldap.url", Some(9)), "{err}");
        assert!(issue.message.contains("allow_plaintext_bind = true"), "{err}");
        let allowed = Config::parse(&ldap("allow_plaintext_bind = true"), "t.toml").unwrap();
        let warnings = allowed.warnings();
        assert!(
            warnings.len() == 1 && warnings[0].starts_with("ldap.allow_plaintext_bind"),
            "{warnings:?}"
        );
        let tls = Config::parse(&ldap("starttls = true"), "t.toml").unwrap();
        assert!(tls.warnings().is_empty());
        let ldaps = Config::parse(
            &ldap("").replace("ldap://ldap.example.org", "ldaps://ldap.example.org"),
            "t.toml",
        )
        .unwrap();
        assert!(ldaps.warnings().is_empty());
    }

    #[test]
    fn verify_hostname_off_needs_a_ca_file() {
        let err = Config::parse(&ldap("starttls = true\nverify_hostname = false"), "t.toml").unwrap_err();
        let issue = &err.issues[0];
        assert_eq!(
            (issue.key.as_str(), issue.line),
            ("ldap.verify_hostname", Some(14)),
            "{err}"
        );
        assert!(issue.message.contains("ca_file"), "{err}");
        Config::parse(
            &ldap("starttls = true\nverify_hostname = false\nca_file = \"/etc/ca.pem\""),
            "t.toml",
        )
        .unwrap();
    }

    #[test]
    fn weak_or_placeholder_discord_keys_are_refused() {
        let discord = |key: &str| {
            format!(
                "{MINIMAL}\n[discord]\nbot_token = {{ env = \"T\" }}\napplication_id = \"1\"\n\
                 default_channel = \"2\"\npublic_key = \"{key}\"\n"
            )
        };
        let text = discord(&"0".repeat(64));
        let key_line = text.lines().position(|l| l.starts_with("public_key")).unwrap() + 1;
        let zero = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(zero.issues[0].key, "discord.public_key", "{zero}");
        assert_eq!(zero.issues[0].line, Some(key_line), "{zero}");
        assert!(zero.to_string().contains("weak (small-order)"), "{zero}");
        // The example's placeholder, uncommented, is refused as such.
        let example =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jitbot.example.toml"))
                .unwrap();
        let placeholder = example
            .lines()
            .find_map(|l| l.strip_prefix("# public_key = "))
            .expect("the example shows the key commented out");
        let text = example.replace(
            &format!("# public_key = {placeholder}"),
            &format!("public_key = {placeholder}"),
        );
        let err = Config::parse(&text, "example").unwrap_err();
        assert!(
            err.to_string().contains("discord.public_key")
                && err
                    .to_string()
                    .contains("is not an Ed25519 public key (64 hex digits)"),
            "{err}"
        );
        let real = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        Config::parse(&discord(real), "t.toml").unwrap();
    }

    #[test]
    fn server_limits_have_safe_defaults_and_the_admin_listener_is_apart() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        let limits = c.server.limits();
        assert!(limits.header_read_timeout <= std::time::Duration::from_secs(10));
        assert!(limits.body_read_timeout <= std::time::Duration::from_secs(10));
        assert!(limits.max_connections >= 64);
        assert_eq!(limits.max_connections_per_ip, 64);
        assert!(limits.max_connections_per_ip < limits.max_connections);
        let zero_ip = format!("[server]\nmax_connections_per_ip = 0\n{MINIMAL}");
        assert!(Config::parse(&zero_ip, "t")
            .unwrap_err()
            .to_string()
            .contains("max_connections_per_ip"));
        assert!(c.server.admin_listen.ip().is_loopback());
        assert_ne!(c.server.admin_listen, c.server.listen);
        assert_eq!(c.server.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let same =
            format!("[server]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n{MINIMAL}");
        let err = Config::parse(&same, "t.toml").unwrap_err();
        assert_eq!(err.issues[0].key, "server.admin_listen", "{err}");
        assert_eq!(err.issues[0].line, Some(3), "{err}");
        let zero = format!("[server]\nmax_connections = 0\n{MINIMAL}");
        assert!(Config::parse(&zero, "t")
            .unwrap_err()
            .to_string()
            .contains("max_connections"));
        let open = format!("[server]\nadmin_listen = \"0.0.0.0:8081\"\n{MINIMAL}");
        let warnings = Config::parse(&open, "t").unwrap().warnings();
        assert!(warnings[0].starts_with("server.admin_listen"), "{warnings:?}");
    }

    #[test]
    fn durations_beyond_the_cap_are_refused_with_key_and_line() {
        for (key, value) in [
            ("max_total_duration", "99999y"),
            ("approval_timeout", "1000years"),
            ("max_duration", "367d"),
        ] {
            let text = MINIMAL.replace(
                "max_duration = \"4h\"",
                &format!("max_duration = \"4h\"\n{key} = \"{value}\""),
            );
            let text = if key == "max_duration" {
                MINIMAL.replace("max_duration = \"4h\"", &format!("max_duration = \"{value}\""))
            } else {
                text
            };
            let err = Config::parse(&text, "t.toml").unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.issues[0].key, key, "{msg}");
            let want_line = text.lines().position(|l| l.contains(value)).map(|i| i + 1);
            assert_eq!(err.issues[0].line, want_line, "{msg}");
            assert!(msg.contains("366 days"), "{msg}");
        }
        let text = MINIMAL.replace(
            "max_duration = \"4h\"",
            "max_duration = \"4h\"\nmax_total_duration = \"366d\"",
        );
        Config::parse(&text, "t.toml").unwrap();
        let text = format!("{MINIMAL}\n[scheduler]\nretry_max = \"500d\"\n");
        let err = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(err.issues[0].key, "retry_max", "{err}");
    }

    #[test]
    fn slack_needs_the_workspace_it_serves() {
        let slack = "\n[slack]\nmode = \"http\"\nbot_token = { env = \"B\" }\nsigning_secret = { env = \"S\" }\ndefault_channel = \"C1\"\n";
        let err = Config::parse(&format!("{MINIMAL}{slack}"), "t").unwrap_err();
        assert_eq!(err.issues[0].key, "slack.team_id", "{err}");
        let bound = format!("{MINIMAL}{slack}team_id = \"T0001\"\napp_id = \"A1\"\n");
        let c = Config::parse(&bound, "t").unwrap();
        assert_eq!(c.slack.unwrap().team_id, "T0001");
    }

    #[test]
    fn discord_api_url_is_a_base_without_the_api_path() {
        let discord = |url: &str| {
            format!(
                "{MINIMAL}\n[discord]\nbot_token = {{ env = \"T\" }}\napplication_id = \"1\"\n\
                 default_channel = \"2\"\n{url}"
            )
        };
        let c = Config::parse(&discord(""), "t").unwrap();
        assert_eq!(c.discord.unwrap().api_url, DISCORD_API);
        let c = Config::parse(&discord("api_url = \"http://127.0.0.1:3000\""), "t").unwrap();
        assert_eq!(c.discord.unwrap().api_url, "http://127.0.0.1:3000");
        for bad in ["discord.com", "https://discord.com/api/v10", "https://proxy/api"] {
            let err = Config::parse(&discord(&format!("api_url = \"{bad}\"")), "t").unwrap_err();
            assert!(err.to_string().contains("discord.api_url"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_durations_and_secrets_in_toml_are_refused() {
        let text = MINIMAL.replace("\"4h\"", "\"forever\"");
        assert!(Config::parse(&text, "t")
            .unwrap_err()
            .to_string()
            .contains("forever"));
        let text = format!("{MINIMAL}\n[server]\nadmin_token = \"plaintext\"\n");
        assert!(
            Config::parse(&text, "t").is_err(),
            "a secret must be a source, not a value"
        );
    }
}
