//! Active Directory for real: a Samba AD domain controller per test
//! (`support::samba`), jitbot's LDAP directory and the real `jitbot` binary
//! against it. The `[ldap]` section and the `db-admins` group come from the
//! example config's Active Directory block, as written.

use crate::support::bot::TestBot;
use crate::support::fake_slack::FakeSlack;
use crate::support::samba::{self, SambaDc};
use jitbot::chat::slack::signature::sign;
use jitbot::config::{Config, GroupConfig};
use jitbot::directory::ldap::LdapDirectory;
use jitbot::engine::Drift;
use jitbot::ports::{Directory, DirectoryError};
use jitbot::secret::SecretSource;
use jitbot_core::policy::Policy;
use jitbot_core::{GroupDn, UserId};
use ldap3::Scope;
use serde_json::json;
use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIGNING: &str = "ad-test-slack-signing-secret";
const TOKEN: &str = "ad-test-admin-token-0123456789";
const EXAMPLE_DOMAIN: &str = "DC=corp,DC=example,DC=com";

/// The example config's Active Directory block, uncommented, for `dc`.
fn example_ad_section(dc: &SambaDc) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jitbot.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let block = text
        .split("# BEGIN active-directory\n")
        .nth(1)
        .and_then(|rest| rest.split("# END active-directory").next())
        .expect("the example config has an active-directory block");
    let uncommented: String = block
        .lines()
        .map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l.strip_prefix('#').unwrap_or(l));
            format!("{l}\n")
        })
        .collect();
    uncommented
        .replace(EXAMPLE_DOMAIN, samba::DOMAIN)
        .replace("ldaps://dc1.corp.example.com", &dc.ldaps_url())
        .replace("/etc/jitbot/ad-ca.pem", &dc.ca_file().display().to_string())
}

/// A whole config: server (public listener on `port`, admin on `port + 1`),
/// store, Slack HTTP mode, then the example's AD block, then `extra` (more
/// `[[group]]`s).
fn config_text(dc: &SambaDc, dir: &Path, port: u16, slack_api: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = {{ env = "AD_TEST_ADMIN" }}
shutdown_grace = "2s"

[store]
path = "{store}"
cache_mb = 16

[scheduler]
max_wait = "1s"
retry_base = "1s"
retry_max = "2s"
zsp_interval = "1h"

[directory]
kind = "ldap"

[slack]
mode = "http"
bot_token = {{ env = "AD_TEST_BOT_TOKEN" }}
signing_secret = {{ env = "AD_TEST_SIGNING" }}
team_id = "T1"
api_url = "{slack_api}"
default_channel = "CJIT"
{ad}
{extra}
"#,
        store = dir.join("db").display(),
        admin_port = port + 1,
        ad = example_ad_section(dc),
    )
}

/// The config parsed, with the password read from the DC's file rather
/// than the example's environment variable.
fn parsed(dc: &SambaDc, extra: &str) -> (Config, Vec<GroupConfig>) {
    let tmp = std::env::temp_dir();
    let text = config_text(dc, &tmp, 1, "http://127.0.0.1:1/api/", extra);
    let mut config = Config::parse(&text, "ad.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let ldap = config.ldap.as_mut().expect("[ldap]");
    assert_eq!(ldap.password.env.as_deref(), Some("JITBOT_LDAP_PASSWORD"));
    ldap.password = SecretSource {
        env: None,
        file: Some(dc.password_file()),
    };
    let groups = config.group_configs().cloned().collect();
    (config, groups)
}

fn directory(dc: &SambaDc, extra: &str) -> LdapDirectory {
    let (config, groups) = parsed(dc, extra);
    LdapDirectory::new(config.ldap.as_ref().unwrap(), &groups).expect("directory")
}

fn group(dn: &str) -> GroupDn {
    GroupDn::new(dn)
}

fn user(id: &str) -> UserId {
    UserId::new(id)
}

fn jitbot() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitbot"));
    cmd.env("JITBOT_LDAP_PASSWORD", samba::SERVICE_PW)
        .env("AD_TEST_ADMIN", TOKEN)
        .env("AD_TEST_BOT_TOKEN", "xoxb-ad-test")
        .env("AD_TEST_SIGNING", SIGNING);
    cmd
}

/// `jitbot check-config` on `text`: exit code and standard error.
fn check_config(dir: &Path, text: &str) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, text).unwrap();
    let out = jitbot()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stdout}{stderr}"))
}

/// The harness's DC answers over LDAPS with the seed an AD admin would build.
#[tokio::test]
async fn the_dc_is_seeded_like_a_real_domain() {
    let dc = SambaDc::start().await;
    let alice = samba::user("alice");
    assert_eq!(dc.values(alice.dn, "sAMAccountName").await, vec!["alice"]);
    assert_eq!(dc.values(alice.dn, "userPrincipalName").await, vec![alice.upn]);
    assert_eq!(dc.values(alice.dn, "mail").await, vec![alice.mail]);
    // carol is an approver only through DB Approvers ∋ DBA Leads ∋ DBA Leads EMEA.
    let mut ldap = dc.admin().await;
    let filter = format!("(memberOf:1.2.840.113556.1.4.1941:={})", samba::DB_APPROVERS);
    let (entries, _) = ldap
        .search(samba::STAFF, Scope::Subtree, &filter, vec!["sAMAccountName"])
        .await
        .and_then(|r| r.success())
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        dc.values(samba::DB_APPROVERS, "member").await,
        vec![samba::DBA_LEADS.to_string()]
    );
    // The service account is no domain admin.
    assert!(!dc
        .values(samba::DOMAIN_ADMINS, "member")
        .await
        .contains(&samba::SERVICE_DN.to_string()));
}

/// Users are found by `sAMAccountName` without regard to case (as AD
/// compares), by `mail` and by `userPrincipalName` (what Slack gives), in
/// `OU=Staff` and in its sub-OU; approvers through groups nested two deep.
#[tokio::test]
async fn identities_and_nested_approvers() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    for u in &samba::USERS {
        let upper = u.sam.to_uppercase();
        for (attr, value) in [
            ("sAMAccountName", upper.as_str()),
            ("mail", u.mail),
            ("userPrincipalName", &u.upn.to_uppercase()),
        ] {
            assert_eq!(
                dir.find_user(attr, value).await.unwrap(),
                Some(user(u.sam)),
                "{attr}={value}"
            );
        }
    }
    assert_eq!(dir.find_user("mail", "nobody@example.com").await.unwrap(), None);

    // dave lives in OU=Contractors,OU=Staff; an id in another case is the
    // same account.
    let db = group(samba::DB_ADMINS);
    dir.add_member(&db, &user("DAVE")).await.unwrap();
    assert_eq!(
        dc.values(samba::DB_ADMINS, "member").await,
        vec![samba::user("dave").dn.to_string()]
    );
    assert!(dir.is_member(&db, &user("dave")).await.unwrap());
    assert_eq!(dir.list_members(&db).await.unwrap(), vec![user("dave")]);
    dir.remove_member(&db, &user("Dave")).await.unwrap();
    assert!(dc.values(samba::DB_ADMINS, "member").await.is_empty());

    let among: BTreeSet<GroupDn> = [samba::DB_APPROVERS, samba::ENGINEERS, samba::FINANCE]
        .iter()
        .map(|g| group(g))
        .collect();
    for (id, expected) in [
        ("carol", vec![samba::DB_APPROVERS]),
        ("CAROL", vec![samba::DB_APPROVERS]),
        ("alice", vec![samba::ENGINEERS]),
        ("dave", vec![samba::ENGINEERS]),
        ("erin", vec![]),
    ] {
        let expected: BTreeSet<GroupDn> = expected.iter().map(|g| group(g)).collect();
        assert_eq!(dir.groups_of(&user(id), &among).await.unwrap(), expected, "{id}");
    }
}

/// LDAPS and StartTLS verify the DC's certificate against `ca_file`, by IP;
/// another CA is refused, and so is a simple bind without TLS, in words an
/// AD admin knows.
#[tokio::test]
async fn ldaps_starttls_and_refusals() {
    let dc = SambaDc::start().await;
    let (config, groups) = parsed(&dc, "");
    let ldap = config.ldap.clone().unwrap();
    assert!(ldap.url.starts_with("ldaps://127.0.0."), "{}", ldap.url);
    LdapDirectory::new(&ldap, &groups).unwrap().ping().await.unwrap();

    let mut starttls = ldap.clone();
    starttls.url = dc.ldap_url();
    starttls.starttls = true;
    let dir = LdapDirectory::new(&starttls, &groups).unwrap();
    dir.ping().await.unwrap();
    assert_eq!(
        dir.find_user("mail", samba::user("bob").mail).await.unwrap(),
        Some(user("bob"))
    );

    let mut wrong_ca = ldap.clone();
    wrong_ca.ca_file = Some(dc.write_file("other-ca.pem", &other_ca()));
    let err = LdapDirectory::new(&wrong_ca, &groups)
        .unwrap()
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS with") && err.contains("ldap.ca_file") && err.contains("UnknownIssuer"),
        "{err}"
    );

    let mut plain = ldap.clone();
    plain.url = dc.ldap_url();
    let err = LdapDirectory::new(&plain, &groups)
        .unwrap()
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the DC requires LDAPS or StartTLS for simple binds (ldap server require strong auth"),
        "{err}"
    );

    // The same, as check-config tells the operator.
    let tmp = tempfile::tempdir().unwrap();
    let text = config_text(&dc, tmp.path(), 1, "http://127.0.0.1:1/api/", "");
    let (code, out) = check_config(tmp.path(), &text);
    assert_eq!(code, Some(0), "{out}");
    // Even with plaintext allowed on jitbot's side, the DC refuses.
    let plain = text.replace(&dc.ldaps_url(), &dc.ldap_url()).replace(
        "active_directory = true",
        "active_directory = true\nallow_plaintext_bind = true",
    );
    let (code, out) = check_config(tmp.path(), &plain);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("the DC requires LDAPS or StartTLS for simple binds (ldap server require strong auth)")
            && out.contains("ldap.starttls = true"),
        "{out}"
    );
    let other = text.replace(
        &dc.ca_file().display().to_string(),
        &dc.write_file("other-ca2.pem", &other_ca()).display().to_string(),
    );
    let (code, out) = check_config(tmp.path(), &other);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("TLS with") && out.contains("UnknownIssuer"), "{out}");
}

/// A CA that did not sign the DC's certificate.
fn other_ca() -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "some other CA");
    ca.self_signed(&key).unwrap().pem()
}

const EXTRA_GROUPS: &str = r#"
[[group]]
name = "web-admins"
dn = "CN=Web Admins,OU=JIT Groups,DC=example,DC=test"
requesters = { users = ["alice"] }
approvers = { users = ["carol"] }
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "finance-approvers"
dn = "CN=Finance Approvers,OU=JIT Groups,DC=example,DC=test"
requesters = { users = ["alice"] }
approvers = { users = ["carol"] }
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "domain-admins"
dn = "CN=Domain Admins,CN=Users,DC=example,DC=test"
requesters = { users = ["alice"] }
approvers = { users = ["carol"] }
default_duration = "1h"
max_duration = "4h"
"#;

/// The delegated service account changes the membership of its groups, and
/// check-config names, before anything runs, a group it may not write (rc
/// 50), a group AdminSDHolder protects, and a DC without TTL membership.
#[tokio::test]
async fn the_delegated_account_and_check_config() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, EXTRA_GROUPS);
    for g in [samba::DB_ADMINS, samba::WEB_ADMINS] {
        // Twice each: AD answers 68 (entryAlreadyExists) to a second add
        // and 53 (unwillingToPerform) to a second removal.
        for u in ["alice", "bob", "alice"] {
            dir.add_member(&group(g), &user(u)).await.unwrap();
        }
        assert_eq!(
            dc.values(g, "member").await,
            vec![
                samba::user("alice").dn.to_string(),
                samba::user("bob").dn.to_string()
            ]
        );
        dir.remove_member(&group(g), &user("alice")).await.unwrap();
        dir.remove_member(&group(g), &user("alice")).await.unwrap();
        assert_eq!(
            dc.values(g, "member").await,
            vec![samba::user("bob").dn.to_string()]
        );
    }
    let err = dir
        .add_member(&group(samba::FINANCE), &user("alice"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("insufficient access") && err.contains(samba::SERVICE_DN),
        "{err}"
    );
    assert!(dc.values(samba::FINANCE, "member").await.is_empty());

    let ttl = EXTRA_GROUPS.replace("name = \"web-admins\"", "name = \"web-admins\"\nad_ttl = true");
    let tmp = tempfile::tempdir().unwrap();
    let text = config_text(&dc, tmp.path(), 1, "http://127.0.0.1:1/api/", &ttl);
    let (code, out) = check_config(tmp.path(), &text);
    assert_eq!(code, Some(64), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let line = |name: &str| {
        lines
            .iter()
            .filter(|l| l.contains(&format!("group {name} (")))
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(line("db-admins").is_empty(), "{out}");
    let finance = line("finance-approvers");
    assert!(
        finance.contains("may not modify `member`") && finance.contains(samba::SERVICE_DN),
        "{out}"
    );
    let domain_admins = line("domain-admins");
    assert!(
        domain_admins.contains("warning:") && domain_admins.contains("AdminSDHolder"),
        "{out}"
    );
    let web = line("web-admins");
    assert!(
        web.contains("warning:")
            && web.contains("the DC refuses TTL membership")
            && web.contains("result code 34")
            && web.contains("falls back to its own revocation"),
        "{out}"
    );
    // The probes left every group as it was.
    assert_eq!(
        dc.values(samba::WEB_ADMINS, "member").await,
        vec![samba::user("bob").dn.to_string()]
    );
    assert!(dc.values(samba::DOMAIN_ADMINS, "member").await.len() == 1);
}

/// `ad_ttl` on a DC that refuses `<TTL=...>` values: jitbot writes plain
/// membership, which its own revocation removes.
#[tokio::test]
async fn ad_ttl_falls_back_to_plain_membership() {
    let dc = SambaDc::start().await;
    let (config, mut groups) = parsed(&dc, "");
    groups[0].ad_ttl = true;
    let dir = LdapDirectory::new(config.ldap.as_ref().unwrap(), &groups).unwrap();
    let db = group(samba::DB_ADMINS);
    dir.add_member(&db, &user("alice")).await.unwrap();
    assert_eq!(
        dc.values(samba::DB_ADMINS, "member").await,
        vec![samba::user("alice").dn.to_string()]
    );
    dir.add_member(&db, &user("erin")).await.unwrap();
    dir.remove_member(&db, &user("alice")).await.unwrap();
    assert_eq!(
        dc.values(samba::DB_ADMINS, "member").await,
        vec![samba::user("erin").dn.to_string()]
    );
}

/// A group of 1,600 members is read whole: AD hands out `member` in ranges
/// of at most 1,500 values, and the members' ids come from a paged search.
#[tokio::test]
async fn large_groups_are_read_completely() {
    let dc = SambaDc::start().await;
    let fleet = format!(
        "\n[[group]]\nname = \"fleet-root\"\ndn = \"{}\"\nzsp = true\n\
         requesters = {{ users = [\"alice\"] }}\napprovers = {{ users = [\"carol\"] }}\n\
         default_duration = \"1h\"\nmax_duration = \"4h\"\n",
        samba::FLEET_ROOT
    );
    // The DC caps the values it sends when asked for a range, as AD does
    // unasked: a reader that stopped after one answer would miss members.
    let mut ldap = dc.admin().await;
    let (entries, _) = ldap
        .search(
            samba::FLEET_ROOT,
            Scope::Base,
            "(objectClass=*)",
            vec!["member;range=0-1499"],
        )
        .await
        .and_then(|r| r.success())
        .unwrap();
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    assert_eq!(entry.attrs.get("member;range=0-1499").map(Vec::len), Some(1500));

    let dir = directory(&dc, &fleet);
    let fleet_root = group(samba::FLEET_ROOT);
    let started = Instant::now();
    let members = dir.list_members(&fleet_root).await.unwrap();
    let took = started.elapsed();
    let expected: Vec<UserId> = (1..=samba::LOAD_USERS)
        .map(|i| user(&format!("load{i:04}")))
        .collect();
    assert_eq!(members.len(), samba::LOAD_USERS, "read in {took:?}");
    assert_eq!(members, expected);
    println!("{} members listed in {took:?}", members.len());
    assert!(dir
        .is_member(&fleet_root, &user(&format!("load{:04}", samba::LOAD_USERS)))
        .await
        .unwrap());

    // One more member past the first range, then one fewer.
    dir.add_member(&fleet_root, &user("alice")).await.unwrap();
    let members = dir.list_members(&fleet_root).await.unwrap();
    assert_eq!(members.len(), samba::LOAD_USERS + 1);
    assert!(members.contains(&user("alice")));
    dir.remove_member(&fleet_root, &user("load0001")).await.unwrap();
    let members = dir.list_members(&fleet_root).await.unwrap();
    assert_eq!(members.len(), samba::LOAD_USERS);
    assert!(!members.contains(&user("load0001")));
}

/// An engine over the DC, with the example's db-admins group (ZSP).
fn zsp_bot(dc: &SambaDc, remediate: bool) -> TestBot {
    let (config, mut groups) = parsed(dc, "");
    groups[0].remediate = remediate;
    let dir = LdapDirectory::new(config.ldap.as_ref().unwrap(), &groups).unwrap();
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    TestBot::builder()
        .policy(|p| *p = policy)
        .directory(Arc::new(dir))
        .build()
}

/// The ZSP monitor against AD, with `remediate`: a user and a nested group
/// added behind jitbot's back are drift; the users the nested group reaches
/// are reported too. Remediation removes the direct values only: the
/// nested group keeps its own members.
#[tokio::test]
async fn zsp_monitor_finds_and_removes_direct_drift() {
    let dc = SambaDc::start().await;
    let bot = zsp_bot(&dc, true);
    dc.set_member(samba::DB_ADMINS, samba::user("bob").dn, true).await;
    dc.set_member(samba::DB_ADMINS, samba::LEGACY_DBAS, true).await;
    let drift = bot.engine.check_zsp().await.unwrap();
    let find = |id: &str| {
        drift
            .iter()
            .find(|d| d.user.as_str().eq_ignore_ascii_case(id))
            .unwrap_or_else(|| panic!("{id} is drift: {drift:?}"))
    };
    let bob = find("bob");
    assert!(bob.remediated && bob.via.is_none(), "{drift:?}");
    let nested = find(samba::LEGACY_DBAS);
    assert!(nested.remediated, "{drift:?}");
    let erin = find("erin");
    assert!(!erin.remediated && erin.via.is_some(), "{drift:?}");
    // The removals are transitions of their own, run by the scheduler.
    bot.run_due().await;
    assert!(
        dc.values(samba::DB_ADMINS, "member").await.is_empty(),
        "bob and the nested group removed"
    );
    assert_eq!(
        dc.values(samba::LEGACY_DBAS, "member").await,
        vec![samba::user("erin").dn.to_string()],
        "a nested group's own members are not jitbot's to remove"
    );
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert!(outbox.contains("bob"), "{outbox}");
}

/// Without `remediate`, members reached through a nested group are
/// reported (standing access all the same) and nothing is removed.
#[tokio::test]
async fn zsp_monitor_reports_nested_members() {
    let dc = SambaDc::start().await;
    let bot = zsp_bot(&dc, false);
    dc.set_member(samba::DB_ADMINS, samba::LEGACY_DBAS, true).await;
    let drift = bot.engine.check_zsp().await.unwrap();
    let erin: Vec<&Drift> = drift.iter().filter(|d| d.user == user("erin")).collect();
    assert_eq!(
        erin.len(),
        1,
        "erin is in DB Admins through Legacy DBAs, standing access the monitor must report: {drift:?}"
    );
    assert!(!erin[0].remediated, "{drift:?}");
    assert!(
        erin[0]
            .via
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case(samba::LEGACY_DBAS)),
        "{drift:?}"
    );
    bot.run_due().await;
    assert_eq!(
        dc.values(samba::DB_ADMINS, "member").await,
        vec![samba::LEGACY_DBAS.to_string()]
    );
}

/// `jitbot run` in Slack HTTP mode, the real binary against the DC.
struct Running {
    child: Child,
    base: String,
    log: std::path::PathBuf,
    http: reqwest::Client,
}

impl Running {
    /// Starts `jitbot run`; its public listener is `base`, the admin one
    /// the next port.
    fn spawn(config: &Path, log: &Path, base: String) -> Running {
        let file = std::fs::File::create(log).unwrap();
        let child = jitbot()
            .args(["run", "--config"])
            .arg(config)
            .env("JITBOT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Running {
            child,
            base,
            log: log.to_path_buf(),
            http: reqwest::Client::new(),
        }
    }

    fn admin_base(&self) -> String {
        let (host, port) = self.base.rsplit_once(':').expect("base has a port");
        let port: u16 = port.parse().expect("port");
        format!("{host}:{}", port + 1)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "jitbot did not come up:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(&self, path: &str, body: String) {
        let ts = chrono::Utc::now().timestamp();
        let status = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sign(SIGNING, ts, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{path}: {status}");
    }

    async fn admin(&self, what: &str) -> Vec<serde_json::Value> {
        self.http
            .get(format!("{}/admin/{what}?all=true", self.admin_base()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits for `what` to hold, for up to 20 s.
    async fn until<F, Fut>(&self, what: &str, f: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; jitbot log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port whose successor is free too (public and admin listeners).
fn free_port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn slack_id(user: &str) -> String {
    format!("U{}", user.to_uppercase())
}

fn click(slack: &FakeSlack, who: &str, id: &str, n: u32) -> String {
    let payload = json!({
        "type": "block_actions",
        "team": {"id": "T1"},
        "api_app_id": "A1",
        "user": {"id": slack_id(who), "username": who, "team_id": "T1"},
        "trigger_id": format!("trigger.{n}"),
        "channel": {"id": "CJIT"},
        "container": {"type": "message", "message_ts": "1.1", "channel_id": "CJIT"},
        "response_url": slack.response_url(n),
        "actions": [{"type": "button", "action_id": format!("jit:approve:{id}"), "action_ts": format!("{n}.0")}]
    });
    form(&[("payload", &payload.to_string())])
}

/// The whole flow through `jitbot run` against the DC, with the example's
/// AD block as written: alice (found by her `mail`) asks; bob, an engineer
/// but no approver, cannot approve; carol approves, an approver only
/// through groups nested two deep; the DC shows the membership (read on a
/// connection of the test's own); it ends and is removed at expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_through_jitbot_run() {
    let dc = SambaDc::start().await;
    let slack = FakeSlack::start().await;
    for u in &samba::USERS {
        slack.add_user(&slack_id(u.sam), u.mail);
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let text = config_text(&dc, tmp.path(), port, &slack.api_url(), "");
    let config = tmp.path().join("jitbot.toml");
    std::fs::write(&config, &text).unwrap();
    let (code, out) = check_config(tmp.path(), &text);
    assert_eq!(code, Some(0), "check-config with the delegated account: {out}");

    let bot = Running::spawn(
        &config,
        &tmp.path().join("jitbot.log"),
        format!("http://127.0.0.1:{port}"),
    );
    bot.wait_up().await;
    bot.post(
        "/slack/commands",
        form(&[
            ("team_id", "T1"),
            ("channel_id", "CJIT"),
            ("user_id", &slack_id("alice")),
            ("user_name", "alice"),
            ("command", "/jit"),
            ("text", "request db-admins 4s restore the replica"),
            ("response_url", &slack.response_url(1)),
            ("trigger_id", "trigger.1"),
        ]),
    )
    .await;
    bot.until("the request", || async {
        !bot.admin("requests").await.is_empty()
    })
    .await;
    let requests = bot.admin("requests").await;
    assert_eq!(requests[0]["state"], "pending", "{requests:?}");
    assert_eq!(requests[0]["requester"], "alice", "{requests:?}");
    let id = requests[0]["id"].as_str().unwrap().to_string();

    bot.post("/slack/interactions", click(&slack, "bob", &id, 2))
        .await;
    slack
        .wait_for(Duration::from_secs(10), |c| c.method == "response/2")
        .await
        .unwrap_or_else(|| panic!("bob got no answer: {:#?}", slack.calls()));
    assert_eq!(bot.admin("requests").await[0]["state"], "pending");

    bot.post("/slack/interactions", click(&slack, "carol", &id, 3))
        .await;
    let alice_dn = samba::user("alice").dn.to_string();
    bot.until("alice's membership on the DC", || async {
        dc.values(samba::DB_ADMINS, "member").await == vec![alice_dn.clone()]
    })
    .await;
    let leases = bot.admin("leases").await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["user"], "alice");

    bot.until("the membership's removal at expiry", || async {
        dc.values(samba::DB_ADMINS, "member").await.is_empty()
    })
    .await;
    bot.until("the lease's end", || async {
        bot.admin("leases").await[0]["state"] == "ended"
    })
    .await;
    let log = bot.log();
    assert!(
        !log.contains(samba::SERVICE_PW),
        "the password leaked into the log"
    );
    drop(bot);

    // Slack users found by `userPrincipalName` instead: dave, whose account
    // is in the sub-OU OU=Contractors, asks.
    for u in &samba::USERS {
        slack.add_user(&slack_id(u.sam), u.upn);
    }
    let by_upn = text.replace(
        "default_channel = \"CJIT\"",
        "default_channel = \"CJIT\"\nuser_attribute = \"userPrincipalName\"",
    );
    std::fs::write(&config, &by_upn).unwrap();
    let bot = Running::spawn(
        &config,
        &tmp.path().join("jitbot2.log"),
        format!("http://127.0.0.1:{port}"),
    );
    bot.wait_up().await;
    bot.post(
        "/slack/commands",
        form(&[
            ("team_id", "T1"),
            ("channel_id", "CJIT"),
            ("user_id", &slack_id("dave")),
            ("user_name", "dave"),
            ("command", "/jit"),
            ("text", "request db-admins 1h vacuum the big table"),
            ("response_url", &slack.response_url(4)),
            ("trigger_id", "trigger.4"),
        ]),
    )
    .await;
    bot.until("dave's request", || async {
        bot.admin("requests")
            .await
            .iter()
            .any(|r| r["requester"] == "dave" && r["state"] == "pending")
    })
    .await;
}

/// Renames or moves `dn` to `rdn` under `parent` as Administrator.
async fn admin_modifydn(dc: &SambaDc, dn: &str, rdn: &str, parent: Option<&str>) {
    let mut ldap = dc.admin().await;
    ldap.modifydn(dn, rdn, true, parent)
        .await
        .and_then(|r| r.success())
        .expect("admin modifydn");
    let _ = ldap.unbind().await;
}

/// A user renamed (new CN) while a lease is active. AD rewrites the
/// group's `member` value to the new DN by itself (a linked attribute), so
/// the value recorded at grant no longer exists. Revocation finds the user
/// by the `objectGUID` recorded with the lease and takes the membership
/// away under the new DN — never reports it removed while the renamed user
/// stays in the group — and tells the audit what happened.
#[tokio::test]
async fn a_user_renamed_during_a_lease_is_still_removed() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    assert_eq!(lease.value, samba::user("alice").dn);
    assert!(
        lease
            .identity
            .as_deref()
            .is_some_and(|i| i.starts_with("objectGUID:")),
        "{lease:?}"
    );
    dir.add_membership(&lease).await.unwrap();

    admin_modifydn(&dc, samba::user("alice").dn, "CN=Alice Archer-Smith", None).await;
    let renamed = "CN=Alice Archer-Smith,OU=Staff,DC=example,DC=test";
    assert_eq!(
        dc.values(samba::DB_ADMINS, "member").await,
        vec![renamed.to_string()]
    );
    assert!(
        dir.has_membership(&lease).await.unwrap(),
        "the lease's membership, under the new DN, is there"
    );

    let removed = dir.revoke_membership(&lease).await;
    let left = dc.values(samba::DB_ADMINS, "member").await;
    assert!(
        removed.is_err() || left.is_empty(),
        "revocation reported success ({removed:?}) but the renamed user is still a member: {left:?}"
    );
    assert!(
        left.is_empty(),
        "the lease's membership outlived it: {left:?} ({removed:?})"
    );
    let note = removed.unwrap().expect("the audit is told");
    assert!(
        note.contains("renamed or moved") && note.contains(renamed),
        "{note}"
    );
}

/// The same for a user moved to another OU (here the sub-OU) while a lease
/// is active.
#[tokio::test]
async fn a_user_moved_during_a_lease_is_still_removed() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("bob")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();

    admin_modifydn(
        &dc,
        samba::user("bob").dn,
        "CN=Bob Baker",
        Some(samba::CONTRACTORS),
    )
    .await;
    let moved = format!("CN=Bob Baker,{}", samba::CONTRACTORS);
    assert_eq!(dc.values(samba::DB_ADMINS, "member").await, vec![moved]);

    let removed = dir.remove_membership(&lease).await;
    let left = dc.values(samba::DB_ADMINS, "member").await;
    assert!(
        removed.is_err() || left.is_empty(),
        "revocation reported success ({removed:?}) but the moved user is still a member: {left:?}"
    );
    assert!(
        left.is_empty(),
        "the lease's membership outlived it: {left:?} ({removed:?})"
    );
}

/// The string form (`S-1-5-21-…`) of a binary `objectSid`.
fn sid_string(b: &[u8]) -> String {
    let authority = b[2..8].iter().fold(0u64, |a, x| (a << 8) | u64::from(*x));
    let subs: Vec<String> = b[8..]
        .chunks(4)
        .take(usize::from(b[1]))
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_string())
        .collect();
    format!("S-{}-{authority}-{}", b[0], subs.join("-"))
}

/// check-config's write probe adds and deletes the *service account's own
/// DN*. AD has a right for exactly that — the validated write "Add/Remove
/// self as member" (SW on `member`) — which an AD admin may well have given
/// the account on a group (or which it inherits). With only that right the
/// probe passes, so on AD check-config also reads the group's
/// `allowedAttributesEffective`, and names the group unwritable.
#[tokio::test]
async fn check_config_is_not_fooled_by_a_right_to_add_oneself() {
    let dc = SambaDc::start().await;
    // OA;;SW;member — Add/Remove self as member, and nothing more — on Finance.
    let mut ldap = dc.admin().await;
    let (entries, _) = ldap
        .search(
            samba::SERVICE_DN,
            Scope::Base,
            "(objectClass=*)",
            vec!["objectSid"],
        )
        .await
        .and_then(|r| r.success())
        .unwrap();
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    let sid = sid_string(&entry.bin_attrs["objectSid"][0]);
    let _ = ldap.unbind().await;
    let out = Command::new(samba::SAMBA_TOOL)
        .args(["dsacl", "set", "-H", &dc.ldap_url(), "-U"])
        .arg(format!("{}%{}", samba::ADMIN, samba::ADMIN_PW))
        .arg(format!("--objectdn={}", samba::FINANCE))
        .arg(format!(
            "--sddl=(OA;;SW;bf9679c0-0de6-11d0-a285-00aa003049e2;;{sid})"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The account really may not write other members there.
    let dir = directory(&dc, EXTRA_GROUPS);
    let err = dir
        .add_member(&group(samba::FINANCE), &user("alice"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("insufficient access"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let text = config_text(&dc, tmp.path(), 1, "http://127.0.0.1:1/api/", EXTRA_GROUPS);
    let (_, out) = check_config(tmp.path(), &text);
    let finance: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("group finance-approvers ("))
        .collect();
    assert!(
        finance.iter().any(|l| l.contains("may not modify `member`")),
        "check-config calls finance-approvers writable, but adding alice there fails: {err}\n{out}"
    );
}

/// AD's primary group is a membership that `member` does not list. A user
/// whose `primaryGroupID` is the ZSP group (AD takes the `member` value
/// away when it is set) has standing access the monitor must see. No
/// member value can be removed, so even with `remediate` it is alerted
/// with what to do, and left alone.
#[tokio::test]
async fn zsp_reports_a_primary_group_membership_without_removing_it() {
    let dc = SambaDc::start().await;
    let bot = zsp_bot(&dc, true);
    let mut ldap = dc.admin().await;
    let (entries, _) = ldap
        .search(
            samba::DB_ADMINS,
            Scope::Base,
            "(objectClass=*)",
            vec!["objectSid"],
        )
        .await
        .and_then(|r| r.success())
        .unwrap();
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    let sid = sid_string(&entry.bin_attrs["objectSid"][0]);
    let rid = sid.rsplit('-').next().unwrap().to_string();
    dc.set_member(samba::DB_ADMINS, samba::user("bob").dn, true).await;
    ldap.modify(
        samba::user("bob").dn,
        vec![ldap3::Mod::Replace(
            "primaryGroupID".to_string(),
            std::collections::HashSet::from([rid.clone()]),
        )],
    )
    .await
    .and_then(|r| r.success())
    .expect("set bob's primary group");
    let _ = ldap.unbind().await;
    // bob is in DB Admins (its token says so), but `member` no longer lists him.
    assert!(dc.values(samba::DB_ADMINS, "member").await.is_empty());

    let drift = bot.engine.check_zsp().await.unwrap();
    let bob: Vec<&Drift> = drift
        .iter()
        .filter(|d| d.user.as_str().eq_ignore_ascii_case("bob"))
        .collect();
    assert!(
        !bob.is_empty(),
        "bob is a member of the ZSP group through primaryGroupID and no drift names him: {drift:?}"
    );
    assert!(bob.iter().all(|d| !d.remediated), "{drift:?}");
    bot.run_due().await;
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert!(
        outbox.contains("primary group") && outbox.contains("set the user's primary group"),
        "{outbox}"
    );
    assert_eq!(
        dc.values(samba::user("bob").dn, "primaryGroupID").await,
        vec![rid],
        "jitbot does not touch a user's primary group"
    );
    // Checked again, it is the same drift, not a new alert.
    let again = bot.engine.check_zsp().await.unwrap();
    assert!(again.iter().any(|d| d.user.as_str().eq_ignore_ascii_case("bob")));
}

/// A grant whose recorded value went stale (the user renamed between
/// jitbot's lookup and its add, e.g. a retry after a restart) is refused by
/// the DC with noSuchObject about the *value*; jitbot must not tell the
/// operator that the group is missing from the directory. (With a recorded
/// identity the add goes to the user's current DN instead: see
/// `a_grant_after_a_rename_and_a_new_user_at_the_old_dn_adds_the_renamed_user`;
/// this is a membership recorded without one, as older versions did.)
#[tokio::test]
async fn a_stale_member_value_is_not_reported_as_a_missing_group() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let mut m = dir.membership_of(&db, &user("alice")).await.unwrap();
    m.identity = None;
    admin_modifydn(&dc, samba::user("alice").dn, "CN=Alice Archer-Smith", None).await;
    let err = dir.add_membership(&m).await.unwrap_err().to_string();
    assert!(
        !err.contains("does not exist in the directory; check its `dn` in the config"),
        "the group exists; the member value is what the DC did not find: {err}"
    );
    assert!(err.contains("Alice Archer"), "{err}");
    assert!(err.contains("names no entry"), "{err}");
}

/// The delegated account disabled (or expired, locked out, due for a
/// password change) is refused by the DC with rc 49 and a sub-code (`data
/// 533` disabled, `532` password expired, `773` must change, `775` locked).
/// jitbot says which, not "check the bind DN and password", which would
/// send the operator after the wrong thing (and re-typing a password into
/// a locked account locks it longer).
#[tokio::test]
async fn a_disabled_service_account_is_reported_as_disabled() {
    let dc = SambaDc::start().await;
    let mut ldap = dc.admin().await;
    ldap.modify(
        samba::SERVICE_DN,
        vec![ldap3::Mod::Replace(
            "userAccountControl".to_string(),
            std::collections::HashSet::from(["66050".to_string()]),
        )],
    )
    .await
    .and_then(|r| r.success())
    .expect("disable the service account");
    let _ = ldap.unbind().await;
    // What the DC says to the bind, on a connection of the test's own.
    let (conn, mut own) = ldap3::LdapConnAsync::with_settings(
        ldap3::LdapConnSettings::new().set_no_tls_verify(true),
        &dc.ldaps_url(),
    )
    .await
    .unwrap();
    ldap3::drive!(conn);
    let said = own
        .simple_bind(samba::SERVICE_DN, samba::SERVICE_PW)
        .await
        .unwrap();
    assert_eq!(said.rc, 49);
    assert!(said.text.contains("data 533"), "{said:?}");
    let dir = directory(&dc, "");
    let err = dir.ping().await.unwrap_err().to_string();
    assert!(
        err.contains("the account is disabled; ask an AD admin to enable it"),
        "the DC said the account is disabled; jitbot says: {err}"
    );
    assert!(!err.contains("password source"), "{err}");
}

/// The group renamed during a lease. Revocation cannot reach it under the
/// recorded DN and says so (retried and alerted by the engine), never
/// "removed".
#[tokio::test]
async fn a_group_renamed_during_a_lease_fails_loudly() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    admin_modifydn(&dc, samba::DB_ADMINS, "CN=DB Admins Old", None).await;
    let removed = dir.remove_membership(&lease).await;
    assert!(
        matches!(removed, Err(DirectoryError::NoSuchGroup(_))),
        "{removed:?}"
    );
    let renamed = "CN=DB Admins Old,OU=JIT Groups,DC=example,DC=test";
    assert_eq!(
        dc.values(renamed, "member").await,
        vec![samba::user("alice").dn.to_string()]
    );
}

/// A user deleted entirely while a lease is active: AD drops their
/// `member` values with the entry. The recorded identity finds no entry and
/// the recorded value is gone, so the lease ends "removed" — and the audit
/// note says why there was nothing left to remove.
#[tokio::test]
async fn a_user_deleted_during_a_lease_ends_removed_and_says_so() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("carol")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    let mut ldap = dc.admin().await;
    ldap.delete(samba::user("carol").dn)
        .await
        .and_then(|r| r.success())
        .expect("delete carol");
    let _ = ldap.unbind().await;
    assert!(dc.values(samba::DB_ADMINS, "member").await.is_empty());

    assert!(!dir.has_membership(&lease).await.unwrap());
    let note = dir.revoke_membership(&lease).await.unwrap();
    let note = note.expect("the audit is told");
    assert!(note.contains("no longer exists"), "{note}");
}

/// Through the engine: a lease whose user is renamed while it runs ends
/// with the membership gone from the DC, and the audit's `lease.ended`
/// says the user was found under their new DN.
#[tokio::test]
async fn a_lease_outlives_no_rename_and_the_audit_says_what_happened() {
    let dc = SambaDc::start().await;
    let (config, groups) = parsed(&dc, EXTRA_GROUPS);
    let dir = LdapDirectory::new(config.ldap.as_ref().unwrap(), &groups).unwrap();
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    let bot = TestBot::builder()
        .policy(|p| *p = policy)
        .directory(Arc::new(dir))
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h deploy").await);
    bot.ok("carol", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(
        dc.values(samba::WEB_ADMINS, "member").await,
        vec![samba::user("alice").dn.to_string()],
        "granted: {:?}",
        bot.audit_actions()
    );

    admin_modifydn(&dc, samba::user("alice").dn, "CN=Alice Archer-Smith", None).await;
    bot.advance(chrono::Duration::hours(2));
    bot.run_due().await;
    assert!(
        dc.values(samba::WEB_ADMINS, "member").await.is_empty(),
        "the renamed user kept the membership after the lease: {:?}",
        bot.audit_actions()
    );
    let ended: Vec<String> = bot
        .engine
        .store()
        .audit(0)
        .map(|e| e.expect("audit"))
        .filter(|e| e.action == "lease.ended")
        .map(|e| e.detail)
        .collect();
    assert!(
        ended
            .iter()
            .any(|d| d.contains("membership removed") && d.contains("renamed or moved")),
        "{ended:?}"
    );
}

// ---- removal by identity against what an adversarial review tried (brk15b) ----

/// The service account's SID string, read as Administrator.
async fn service_sid(dc: &SambaDc) -> String {
    let mut ldap = dc.admin().await;
    let (entries, _) = ldap
        .search(
            samba::SERVICE_DN,
            Scope::Base,
            "(objectClass=*)",
            vec!["objectSid"],
        )
        .await
        .and_then(|r| r.success())
        .unwrap();
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    let _ = ldap.unbind().await;
    sid_string(&entry.bin_attrs["objectSid"][0])
}

/// Adds an entry as Administrator.
async fn admin_add(dc: &SambaDc, dn: &str, attrs: Vec<(&str, Vec<&str>)>) {
    let mut ldap = dc.admin().await;
    let attrs: Vec<(String, HashSet<String>)> = attrs
        .into_iter()
        .map(|(a, vs)| (a.to_string(), vs.into_iter().map(String::from).collect()))
        .collect();
    ldap.add(dn, attrs)
        .await
        .and_then(|r| r.success())
        .unwrap_or_else(|e| panic!("admin add {dn}: {e}"));
    let _ = ldap.unbind().await;
}

// Shows: a user moved into an OU the service account cannot read keeps the
// membership, and revocation reports success ("no longer exists") because
// the <GUID=…> lookup finds nothing. Fix: do not take "GUID not found" for
// deletion — read the group's `member` with the extended-DN control
// (1.2.840.113556.1.4.529, values carry <GUID=…>) to find the value, or
// confirm deletion via the Show Deleted control; otherwise fail loudly.
#[tokio::test]
async fn a_user_moved_into_an_ou_the_service_account_cannot_read_is_still_removed() {
    let dc = SambaDc::start().await;
    let hidden = "OU=Hidden,DC=example,DC=test";
    admin_add(&dc, hidden, vec![("objectClass", vec!["organizationalUnit"])]).await;
    let sid = service_sid(&dc).await;
    let out = Command::new(samba::SAMBA_TOOL)
        .args(["dsacl", "set", "-H", &dc.ldap_url(), "-U"])
        .arg(format!("{}%{}", samba::ADMIN, samba::ADMIN_PW))
        .arg(format!("--objectdn={hidden}"))
        .arg(format!("--sddl=(D;CI;RPLCLORC;;;{sid})"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    admin_modifydn(&dc, samba::user("alice").dn, "CN=Alice Archer", Some(hidden)).await;
    let moved = format!("CN=Alice Archer,{hidden}");
    assert_eq!(dc.values(samba::DB_ADMINS, "member").await, vec![moved.clone()]);

    // The service account cannot read alice's entry any more, but the
    // group's value still carries her GUID (extended-DN control).
    assert!(dir.has_membership(&lease).await.unwrap());
    let removed = dir.revoke_membership(&lease).await;
    let left = dc.values(samba::DB_ADMINS, "member").await;
    assert!(
        removed.is_ok() && left.is_empty(),
        "revocation said {removed:?} and the group holds {left:?}"
    );
}

// Shows: the grant adds the Membership value recorded before it (recorded in
// the store, then the add; after a restart in between, executor.rs reuses the
// recorded one however old): here the user is renamed and a new user created
// under the old DN in between — jitbot adds the *new* user, and the lease's
// removal later goes to the renamed user, so the new user keeps the
// membership forever. Fix: resolve the recorded identity before the add
// (add the user's current DN, or refuse when the entry at the recorded DN
// is not the recorded identity), and check it again on read-back.
#[tokio::test]
async fn a_grant_after_a_rename_and_a_new_user_at_the_old_dn_adds_the_renamed_user() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    // Between recording the Membership and the add (e.g. a directory outage
    // the grant retries through): alice renamed, another account created
    // under her old DN.
    admin_modifydn(&dc, samba::user("alice").dn, "CN=Alice Archer-Smith", None).await;
    admin_add(
        &dc,
        samba::user("alice").dn,
        vec![("objectClass", vec!["user"]), ("sAMAccountName", vec!["mallory"])],
    )
    .await;
    let added = dir.add_membership(&lease).await;
    let during = dc.values(samba::DB_ADMINS, "member").await;
    let _ = dir.revoke_membership(&lease).await;
    let after = dc.values(samba::DB_ADMINS, "member").await;
    assert!(
        after.is_empty(),
        "add {added:?} left the group {during:?}; after the lease's removal the group still holds {after:?} \
         (an account jitbot granted but never removes)"
    );
    assert!(
        added.is_ok() && during == vec!["CN=Alice Archer-Smith,OU=Staff,DC=example,DC=test".to_string()],
        "add {added:?}: jitbot must grant alice (renamed), not the account now at her old DN: {during:?}"
    );
}

// A lease whose recorded identity matches no member value while the
// recorded DN is a value linking to another entry (here: a record altered
// in the store; in life also a rename whose DN was reused and whose
// membership someone removed): that value is not the lease's, so nothing is
// removed, and the note (which goes into the audit) names both identities.
// Store integrity is trusted (SECURITY.md); this is what tampering shows.
#[tokio::test]
async fn an_identity_matching_no_value_leaves_another_entrys_value_and_says_so() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let mut lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    let alice = lease.identity.clone().unwrap();
    lease.identity = Some(format!("objectGUID:{}", "0f".repeat(16)));
    let removed = dir.revoke_membership(&lease).await;
    let left = dc.values(samba::DB_ADMINS, "member").await;
    assert_eq!(left, vec![samba::user("alice").dn.to_string()], "{removed:?}");
    let note = removed.unwrap().unwrap();
    assert!(
        note.contains(&"0f".repeat(16)) && note.contains(&alice) && note.contains("left in place"),
        "{note}"
    );
}

// The recorded identity decides which value is the lease's, over the
// recorded DN: that is what makes a renamed user's membership go. So a
// record whose identity was swapped in the store for a standing member's
// removes that member's value and leaves the DN recorded. The store is
// trusted (SECURITY.md: its integrity rests on its access control); the
// note, which goes into the audit, names the value removed.
#[tokio::test]
async fn a_recorded_identity_is_trusted_over_the_recorded_dn() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    dc.set_member(samba::DB_ADMINS, samba::user("bob").dn, true).await;
    let bob = dir.membership_of(&db, &user("bob")).await.unwrap();
    let mut lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    lease.identity = bob.identity.clone();
    let removed = dir.revoke_membership(&lease).await;
    let left = dc.values(samba::DB_ADMINS, "member").await;
    assert_eq!(left, vec![samba::user("alice").dn.to_string()], "{removed:?}");
    let note = removed.unwrap().unwrap();
    assert!(note.contains(samba::user("bob").dn), "{note}");
}

// An admin sets the leased user's primaryGroupID to the managed group
// during the lease (AD then drops the `member` value): the user is still in
// the group, so has_membership says so and the removal fails with what to
// do, instead of ending the lease as removed.
#[tokio::test]
async fn a_primary_group_set_during_a_lease_fails_the_removal_with_what_to_do() {
    let dc = SambaDc::start().await;
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("bob")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    let mut ldap = dc.admin().await;
    let (entries, _) = ldap
        .search(
            samba::DB_ADMINS,
            Scope::Base,
            "(objectClass=*)",
            vec!["objectSid"],
        )
        .await
        .and_then(|r| r.success())
        .unwrap();
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    let sid = sid_string(&entry.bin_attrs["objectSid"][0]);
    let rid = sid.rsplit('-').next().unwrap().to_string();
    ldap.modify(
        samba::user("bob").dn,
        vec![ldap3::Mod::Replace(
            "primaryGroupID".to_string(),
            HashSet::from([rid.clone()]),
        )],
    )
    .await
    .and_then(|r| r.success())
    .expect("set bob's primary group");
    let _ = ldap.unbind().await;
    let has = dir.has_membership(&lease).await;
    let removed = dir.revoke_membership(&lease).await;
    let pg = dc.values(samba::user("bob").dn, "primaryGroupID").await;
    assert_eq!(pg, vec![rid.clone()]);
    assert!(matches!(has, Ok(true)), "{has:?}");
    let err = removed
        .expect_err("bob is still in DB Admins through primaryGroupID")
        .to_string();
    assert!(err.contains("primary group back"), "{err}");
}

// A service account that may write `member` of DB Admins but not read it:
// check-config says so (its probe value is read back), and a grant's
// read-back error says the value may be unreadable.
#[tokio::test]
async fn check_config_names_a_group_whose_member_it_may_write_but_not_read() {
    let dc = SambaDc::start().await;
    let sid = service_sid(&dc).await;
    // OD;;RP;member — deny reading `member` of DB Admins (writing stays).
    let out = Command::new(samba::SAMBA_TOOL)
        .args(["dsacl", "set", "-H", &dc.ldap_url(), "-U"])
        .arg(format!("{}%{}", samba::ADMIN, samba::ADMIN_PW))
        .arg(format!("--objectdn={}", samba::DB_ADMINS))
        .arg(format!(
            "--sddl=(OD;;RP;bf9679c0-0de6-11d0-a285-00aa003049e2;;{sid})"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = directory(&dc, "");
    let db = group(samba::DB_ADMINS);
    let lease = dir.membership_of(&db, &user("alice")).await.unwrap();
    let added = dir.add_membership(&lease).await;
    let members = dc.values(samba::DB_ADMINS, "member").await;
    let tmp = tempfile::tempdir().unwrap();
    let text = config_text(&dc, tmp.path(), 1, "http://127.0.0.1:1/api/", "");
    let (rc, cc) = check_config(tmp.path(), &text);
    assert!(
        rc != Some(0) && cc.contains("may write but not read `member`") && cc.contains("DB Admins"),
        "check-config rc {rc:?}:\n{cc}"
    );
    let added = added.expect_err("the read-back cannot see the value").to_string();
    assert!(added.contains("may write but not read"), "{added}");
    assert_eq!(members, vec![samba::user("alice").dn.to_string()]);
}
