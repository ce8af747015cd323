//! The LDAP directory against a real slapd: membership of each kind,
//! hostile lookups, bad credentials, an outage, nesting and TLS.

use crate::support::slapd::*;
use jitbot::config::LdapConfig;
use jitbot::directory::ldap::LdapDirectory;
use jitbot::ports::{Directory, DirectoryError};
use jitbot::secret::SecretSource;
use jitbot_core::{GroupDn, UserId};
use ldap3::Mod;
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};

fn directory(config: &LdapConfig) -> LdapDirectory {
    LdapDirectory::new(config, &group_configs()).expect("LdapDirectory::new")
}

fn user(id: &str) -> UserId {
    UserId::new(id)
}

fn group(dn: &str) -> GroupDn {
    GroupDn::new(dn)
}

fn person(uid: &str) -> String {
    format!("uid={uid},{PEOPLE}")
}

fn ids(list: &[&str]) -> Vec<UserId> {
    list.iter().map(|s| user(s)).collect()
}

#[tokio::test]
async fn member_groups_add_remove_idempotent_and_read_back() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let (g, alice, bob) = (group(DB_ADMINS), user("alice"), user("bob"));

    dir.add_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &bob).await.unwrap();
    let mut want = vec![person("alice"), person("bob"), SERVICE_DN.to_string()];
    want.sort();
    assert_eq!(slapd.values(DB_ADMINS, "member").await, want);
    assert!(dir.is_member(&g, &alice).await.unwrap());
    assert_eq!(
        dir.list_members(&g).await.unwrap(),
        ids(&["alice", "bob"]),
        "placeholder excluded"
    );

    dir.remove_member(&g, &alice).await.unwrap();
    dir.remove_member(&g, &alice).await.unwrap();
    assert!(!dir.is_member(&g, &alice).await.unwrap());
    dir.remove_member(&g, &bob).await.unwrap();
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    assert_eq!(
        dir.list_members(&g).await.unwrap(),
        Vec::<UserId>::new(),
        "ZSP group empty at rest"
    );
}

#[tokio::test]
async fn unique_member_groups() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let (g, alice) = (group(OPS), user("alice"));
    dir.add_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &alice).await.unwrap();
    assert_eq!(
        slapd.values(OPS, "uniqueMember").await,
        vec![SERVICE_DN.to_string(), person("alice")]
    );
    assert_eq!(dir.list_members(&g).await.unwrap(), ids(&["alice"]));
    assert!(dir.is_member(&g, &alice).await.unwrap());
    dir.remove_member(&g, &alice).await.unwrap();
    dir.remove_member(&g, &alice).await.unwrap();
    assert_eq!(
        slapd.values(OPS, "uniqueMember").await,
        vec![SERVICE_DN.to_string()]
    );
    assert!(!dir.is_member(&g, &alice).await.unwrap());
}

#[tokio::test]
async fn member_uid_groups_hold_the_user_id() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let (g, alice, bob) = (group(POSIX_ADMINS), user("alice"), user("bob"));
    // Removing from a group that has no memberUid at all is a no-op.
    dir.remove_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &bob).await.unwrap();
    assert_eq!(
        slapd.values(POSIX_ADMINS, "memberUid").await,
        vec!["alice", "bob"]
    );
    assert_eq!(dir.list_members(&g).await.unwrap(), ids(&["alice", "bob"]));
    dir.remove_member(&g, &alice).await.unwrap();
    dir.remove_member(&g, &bob).await.unwrap();
    dir.remove_member(&g, &bob).await.unwrap();
    assert!(
        slapd.values(POSIX_ADMINS, "memberUid").await.is_empty(),
        "posix groups can be empty"
    );
    assert!(matches!(
        dir.add_member(&g, &user("nobody")).await,
        Err(DirectoryError::NoSuchUser(_))
    ));
}

#[tokio::test]
async fn last_member_removal_uses_the_placeholder() {
    let slapd = Slapd::start();
    let (g, dave) = (group(WEB_ADMINS), user("dave"));

    let mut without = slapd.ldap_config();
    without.placeholder_dn = None;
    let err = directory(&without).remove_member(&g, &dave).await.unwrap_err();
    assert!(
        matches!(&err, DirectoryError::Refused(m) if m.contains("ldap.placeholder_dn")),
        "{err}"
    );
    assert_eq!(slapd.values(WEB_ADMINS, "member").await, vec![person("dave")]);

    let dir = directory(&slapd.ldap_config());
    dir.remove_member(&g, &dave).await.unwrap();
    assert_eq!(
        slapd.values(WEB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    assert!(dir.list_members(&g).await.unwrap().is_empty());
    dir.remove_member(&g, &dave).await.unwrap();
}

#[tokio::test]
async fn hostile_lookups_never_match_another_entry() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    assert_eq!(dir.find_user("uid", "alice").await.unwrap(), Some(user("alice")));
    assert_eq!(
        dir.find_user("mail", "bob@example.org").await.unwrap(),
        Some(user("bob"))
    );
    for hostile in [
        "*",
        ")(uid=*",
        "alice)(uid=*",
        "*)(|(uid=*",
        "\\",
        "\\2a",
        "alice\0",
        "\0",
        "",
        "al*",
        "zoe",
        "x,y+z,ou=people",
        "uid=alice,ou=people,dc=example,dc=org",
    ] {
        for attr in ["uid", "mail", "cn"] {
            let got = dir.find_user(attr, hostile).await;
            assert!(matches!(got, Ok(None)), "{attr}={hostile:?} gave {got:?}");
        }
    }
    // Special characters and non-ASCII find exactly their own entry.
    for id in ["zoë", "x,y+z", "evil,+\"\\<>;"] {
        assert_eq!(dir.find_user("uid", id).await.unwrap(), Some(user(id)), "{id}");
    }
    assert_eq!(
        dir.find_user("mail", "evil@example.org").await.unwrap(),
        Some(user("evil,+\"\\<>;"))
    );
    let err = dir.find_user("mail", "oncall@example.org").await.unwrap_err();
    assert!(matches!(err, DirectoryError::Ambiguous(_)), "{err}");
    let err = dir.find_user("uid=*)(mail", "x").await.unwrap_err();
    assert!(matches!(err, DirectoryError::Refused(_)), "{err}");
}

#[tokio::test]
async fn hostile_names_round_trip_through_groups() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let g = group(DB_ADMINS);
    let hostile = ["x,y+z", "evil,+\"\\<>;", "zoë"];
    for id in hostile {
        dir.add_member(&g, &user(id)).await.unwrap();
        assert!(dir.is_member(&g, &user(id)).await.unwrap(), "{id}");
    }
    let mut want = ids(&hostile);
    want.sort();
    assert_eq!(dir.list_members(&g).await.unwrap(), want);
    assert_eq!(slapd.values(DB_ADMINS, "member").await.len(), 4);
    for id in hostile {
        dir.remove_member(&g, &user(id)).await.unwrap();
    }
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    // A hostile id that is nobody's: no entry is touched.
    assert!(!dir.is_member(&group(WEB_ADMINS), &user("*")).await.unwrap());
    dir.remove_member(&group(WEB_ADMINS), &user("*")).await.unwrap();
    assert_eq!(slapd.values(WEB_ADMINS, "member").await, vec![person("dave")]);
}

/// Collects everything logged while it is the thread's default subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test]
async fn wrong_password_is_a_clear_error_without_the_secret() {
    let slapd = Slapd::start();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let secret = "Tr0ub4dor&3-not-the-password";
    let mut config = slapd.ldap_config();
    config.password = slapd.password_file("wrong.pw", secret);
    let dir = directory(&config);
    for result in [
        dir.ping().await,
        dir.add_member(&group(DB_ADMINS), &user("alice")).await,
    ] {
        let err = result.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DirectoryError::Refused(_)), "{text}");
        assert!(
            text.contains("bind failed: check ldap.bind_dn and the password source"),
            "{text}"
        );
        assert!(!text.contains(secret), "{text}");
    }
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("invalid credentials"),
        "the failure is logged: {logged}"
    );
    assert!(!logged.contains(secret), "{logged}");

    let mut unset = slapd.ldap_config();
    unset.password = SecretSource::env("JITBOT_TEST_LDAP_PASSWORD_SURELY_UNSET");
    let err = LdapDirectory::new(&unset, &[])
        .err()
        .expect("missing password refused");
    assert!(err.to_string().contains("ldap.password"), "{err}");
}

#[tokio::test]
async fn outage_then_recovery_without_a_new_directory() {
    let mut slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let (g, alice, bob) = (group(DB_ADMINS), user("alice"), user("bob"));
    dir.ping().await.unwrap();
    dir.add_member(&g, &alice).await.unwrap();

    slapd.stop();
    let err = dir.add_member(&g, &bob).await.unwrap_err();
    assert!(matches!(err, DirectoryError::Unavailable(_)), "{err}");
    assert!(err.is_transient());
    let err = dir.ping().await.unwrap_err();
    assert!(err.to_string().contains(&slapd.url()), "says which server: {err}");

    slapd.restart();
    dir.remove_member(&g, &alice).await.unwrap();
    dir.add_member(&g, &bob).await.unwrap();
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string(), person("bob")]
    );

    // A restart between two operations: the stale handle is replaced and
    // the operation goes through on its first call.
    slapd.stop();
    slapd.restart();
    dir.remove_member(&g, &bob).await.unwrap();
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
}

#[tokio::test]
async fn nested_groups_of() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let among: BTreeSet<GroupDn> = [
        SECURITY,
        APPROVERS,
        CHANGE_BOARD,
        DB_ADMINS,
        WEB_ADMINS,
        POSIX_ADMINS,
        AUDITORS,
    ]
    .into_iter()
    .map(group)
    .collect();
    let of = |dns: &[&str]| dns.iter().map(|d| group(d)).collect::<BTreeSet<_>>();

    assert_eq!(
        dir.groups_of(&user("carol"), &among).await.unwrap(),
        of(&[SECURITY, APPROVERS, CHANGE_BOARD])
    );
    assert_eq!(
        dir.groups_of(&user("dave"), &among).await.unwrap(),
        of(&[WEB_ADMINS])
    );
    assert_eq!(
        dir.groups_of(&user("eve"), &among).await.unwrap(),
        of(&[AUDITORS])
    );
    assert_eq!(dir.groups_of(&user("alice"), &among).await.unwrap(), of(&[]));
    assert_eq!(dir.groups_of(&user("nobody"), &among).await.unwrap(), of(&[]));
    // Case of the configured DN does not matter.
    let upper: BTreeSet<GroupDn> = [group(&APPROVERS.to_uppercase())].into();
    assert_eq!(dir.groups_of(&user("carol"), &upper).await.unwrap(), upper);

    dir.add_member(&group(POSIX_ADMINS), &user("alice"))
        .await
        .unwrap();
    assert_eq!(
        dir.groups_of(&user("alice"), &among).await.unwrap(),
        of(&[POSIX_ADMINS])
    );

    let mut shallow = slapd.ldap_config();
    shallow.nested_depth = 1;
    assert_eq!(
        directory(&shallow)
            .groups_of(&user("carol"), &among)
            .await
            .unwrap(),
        of(&[SECURITY, APPROVERS])
    );
}

#[tokio::test]
async fn missing_groups_and_missing_rights_are_named() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let nope = group("cn=nope,ou=groups,dc=example,dc=org");
    let alice = user("alice");
    assert!(matches!(
        dir.add_member(&nope, &alice).await,
        Err(DirectoryError::NoSuchGroup(_))
    ));
    assert!(matches!(
        dir.remove_member(&nope, &alice).await,
        Err(DirectoryError::NoSuchGroup(_))
    ));
    assert!(matches!(
        dir.list_members(&nope).await,
        Err(DirectoryError::NoSuchGroup(_))
    ));
    assert!(matches!(
        dir.is_member(&nope, &alice).await,
        Err(DirectoryError::NoSuchGroup(_))
    ));
    let err = dir.add_member(&group(AUDITORS), &alice).await.unwrap_err();
    assert!(
        matches!(&err, DirectoryError::Refused(m) if m.contains("insufficient access")),
        "{err}"
    );
    assert!(matches!(
        dir.add_member(&group(DB_ADMINS), &user("nobody")).await,
        Err(DirectoryError::NoSuchUser(_))
    ));
}

#[tokio::test]
async fn concurrent_operations_share_one_connection() {
    let slapd = Slapd::start();
    let dir = Arc::new(directory(&slapd.ldap_config()));
    let tasks: Vec<_> = ["alice", "bob", "carol", "dave", "eve"]
        .into_iter()
        .map(|id| {
            let dir = dir.clone();
            tokio::spawn(async move {
                dir.add_member(&group(DB_ADMINS), &user(id)).await?;
                dir.is_member(&group(DB_ADMINS), &user(id)).await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    assert_eq!(dir.list_members(&group(DB_ADMINS)).await.unwrap().len(), 5);
}

#[tokio::test]
async fn check_groups_reports_in_plain_words() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let groups = group_configs();
    assert_eq!(dir.check_groups(&groups).await, Vec::<String>::new());
    // The write check leaves every group as it was.
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    assert_eq!(slapd.values(WEB_ADMINS, "member").await, vec![person("dave")]);
    assert!(slapd.values(POSIX_ADMINS, "memberUid").await.is_empty());

    let mut bad = groups.clone();
    bad[0].dn = "cn=nope,ou=groups,dc=example,dc=org".into();
    bad[1].dn = AUDITORS.into();
    bad[2].membership = jitbot::config::MembershipKind::MemberUid;
    let problems = dir.check_groups(&bad).await;
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].contains("does not exist"), "{}", problems[0]);
    assert!(problems[1].contains("may not modify `member`"), "{}", problems[1]);
    assert!(problems[2].contains("posixGroup"), "{}", problems[2]);

    let mut config = slapd.ldap_config();
    config.password = slapd.password_file("bad.pw", "nope");
    let problems = directory(&config).check_groups(&groups).await;
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("bind failed"), "{}", problems[0]);
}

/// A CA, and a server certificate for `host` signed by it: (cert, key, ca).
fn certificates(host: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "jitbot test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec![host.to_string()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, host);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem(), ca_cert.pem())
}

fn tls_slapd(host: &str) -> Slapd {
    let (cert, key, ca) = certificates(host);
    Slapd::start_tls(&cert, &key, &ca)
}

#[tokio::test]
async fn starttls_and_ldaps_with_a_private_ca() {
    let slapd = tls_slapd("localhost");
    let mut starttls = slapd.ldap_config();
    starttls.url = format!("ldap://localhost:{}", slapd.port());
    starttls.starttls = true;
    starttls.ca_file = Some(slapd.ca_file());
    let dir = directory(&starttls);
    dir.ping().await.unwrap();
    dir.add_member(&group(DB_ADMINS), &user("alice")).await.unwrap();

    let mut ldaps = slapd.ldap_config();
    ldaps.url = slapd.ldaps_url();
    ldaps.ca_file = Some(slapd.ca_file());
    let dir = directory(&ldaps);
    dir.ping().await.unwrap();
    assert_eq!(
        dir.list_members(&group(DB_ADMINS)).await.unwrap(),
        ids(&["alice"])
    );

    // Without the private CA the server is not trusted.
    ldaps.ca_file = None;
    let err = directory(&ldaps).ping().await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let slapd = tls_slapd("wrong.example.net");
    let mut ldaps = slapd.ldap_config();
    ldaps.url = slapd.ldaps_url();
    ldaps.ca_file = Some(slapd.ca_file());
    let err = directory(&ldaps).ping().await.unwrap_err();
    assert!(
        matches!(&err, DirectoryError::Refused(m) if m.contains("not valid for name")),
        "{err}"
    );

    let mut starttls = slapd.ldap_config();
    starttls.url = format!("ldap://localhost:{}", slapd.port());
    starttls.starttls = true;
    starttls.ca_file = Some(slapd.ca_file());
    let err = directory(&starttls).ping().await.unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");

    // Turning host name checks off accepts it (the chain is still checked).
    ldaps.verify_hostname = false;
    directory(&ldaps).ping().await.unwrap();
}

// Write-combining: concurrent changes to one group share modifies.

/// Adds people `u000000..` (`from` to `from + n`) as the root; returns their ids.
async fn add_people(slapd: &Slapd, from: usize, n: usize) -> Vec<String> {
    let mut ldap = slapd.admin().await;
    let mut uids = Vec::new();
    for i in from..from + n {
        let uid = format!("u{i:06}");
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid.as_str()])),
            ("cn", HashSet::from([uid.as_str()])),
            ("sn", HashSet::from(["batch"])),
        ];
        ldap.add(&person(&uid), attrs)
            .await
            .and_then(|r| r.success())
            .expect("add person");
        uids.push(uid);
    }
    uids
}

/// Adds `values` to `attr` of `dn` as the root, in one modify.
async fn add_values(slapd: &Slapd, dn: &str, attr: &str, values: &[String]) {
    let mut ldap = slapd.admin().await;
    let values: HashSet<&str> = values.iter().map(String::as_str).collect();
    ldap.modify(dn, vec![Mod::Add(attr, values)])
        .await
        .and_then(|r| r.success())
        .expect("admin modify");
}

/// Runs `change` for every id at once; the results in the ids' order.
async fn all_at_once<F, Fut>(
    dir: &Arc<LdapDirectory>,
    g: &str,
    uids: &[String],
    change: F,
) -> Vec<Result<(), DirectoryError>>
where
    F: Fn(Arc<LdapDirectory>, GroupDn, UserId) -> Fut,
    Fut: std::future::Future<Output = Result<(), DirectoryError>> + Send + 'static,
{
    let tasks: Vec<_> = uids
        .iter()
        .map(|id| tokio::spawn(change(dir.clone(), group(g), user(id))))
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    results
}

async fn remove_all(dir: &Arc<LdapDirectory>, g: &str, uids: &[String]) -> Vec<Result<(), DirectoryError>> {
    all_at_once(dir, g, uids, |dir, g, u| async move {
        dir.remove_member(&g, &u).await
    })
    .await
}

async fn add_all(dir: &Arc<LdapDirectory>, g: &str, uids: &[String]) -> Vec<Result<(), DirectoryError>> {
    all_at_once(
        dir,
        g,
        uids,
        |dir, g, u| async move { dir.add_member(&g, &u).await },
    )
    .await
}

fn assert_all_ok(results: &[Result<(), DirectoryError>], uids: &[String]) {
    for (result, id) in results.iter().zip(uids) {
        assert!(result.is_ok(), "{id}: {result:?}");
    }
    assert_eq!(results.len(), uids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_removals_are_combined_into_fewer_modifies() {
    let slapd = Slapd::start();
    let uids = add_people(&slapd, 0, 200).await;
    let dns: Vec<String> = uids.iter().map(|u| person(u)).collect();
    add_values(&slapd, DB_ADMINS, "member", &dns).await;
    // A standing member nobody revokes.
    add_values(&slapd, DB_ADMINS, "member", &[person("alice")]).await;
    assert_eq!(slapd.values(DB_ADMINS, "member").await.len(), 202);

    let dir = Arc::new(directory(&slapd.ldap_config()));
    let results = remove_all(&dir, DB_ADMINS, &uids).await;
    assert_all_ok(&results, &uids);
    let mut want = vec![person("alice"), SERVICE_DN.to_string()];
    want.sort();
    assert_eq!(slapd.values(DB_ADMINS, "member").await, want);
    let modifies = dir.modify_count();
    eprintln!("200 concurrent removals: {modifies} modify operations");
    assert!(modifies < 200, "{modifies} modifies for 200 removals");

    // Removing them all again: every value is absent, every call succeeds.
    let results = remove_all(&dir, DB_ADMINS, &uids).await;
    assert_all_ok(&results, &uids);
    assert_eq!(slapd.values(DB_ADMINS, "member").await, want);
    assert!(!dir.is_member(&group(DB_ADMINS), &user("u000000")).await.unwrap());
}

/// A mass expiry's removals reach slapd as one modify of thousands of
/// values (`MAX_BATCH`), not as modifies of a few hundred: slapd takes a
/// 2,000-value delete, and the batch's read-back confirms every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_removals_go_out_in_a_couple_of_modifies() {
    let slapd = Slapd::start();
    let uids = add_people(&slapd, 0, 2000).await;
    let dns: Vec<String> = uids.iter().map(|u| person(u)).collect();
    add_values(&slapd, DB_ADMINS, "member", &dns).await;
    assert_eq!(slapd.values(DB_ADMINS, "member").await.len(), 2001);

    let dir = Arc::new(directory(&slapd.ldap_config()));
    // As the engine revokes: the recorded membership, no lookup first.
    let tasks: Vec<_> = dns
        .iter()
        .map(|dn| {
            let dir = dir.clone();
            let m = jitbot_core::Membership {
                group: group(DB_ADMINS),
                attribute: "member".into(),
                value: dn.clone(),
                identity: None,
            };
            tokio::spawn(async move { dir.remove_membership(&m).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    assert_all_ok(&results, &uids);
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    // The first removal finds the group idle and goes alone; the others
    // queue behind it and go together, in one modify or a few as they
    // arrive (with 256 values per modify: at least nine in all).
    let modifies = dir.modify_count();
    eprintln!("2,000 concurrent removals: {modifies} modify operations");
    assert!(modifies <= 5, "{modifies} modifies for 2,000 removals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combined_removal_with_an_absent_value_falls_back_per_value() {
    let slapd = Slapd::start();
    let uids = add_people(&slapd, 0, 100).await;
    // Every other person is a member; the others are already absent.
    let members: Vec<String> = uids.iter().step_by(2).map(|u| person(u)).collect();
    add_values(&slapd, DB_ADMINS, "member", &members).await;

    let dir = Arc::new(directory(&slapd.ldap_config()));
    dir.ping().await.expect("a connection before slapd stops");
    // The first removal goes to an idle group and is held in flight (slapd
    // stopped: it takes requests and answers none); the other 99 queue
    // behind it and are sent together, so a combined modify surely meets
    // an absent value, however loaded the machine. The memberships carry
    // no identity: nothing is looked up before the modify.
    let remove = |u: &String| {
        let dir = dir.clone();
        let m = jitbot_core::Membership {
            group: group(DB_ADMINS),
            attribute: "member".into(),
            value: person(u),
            identity: None,
        };
        tokio::spawn(async move { dir.remove_membership(&m).await })
    };
    slapd.signal("-STOP");
    let first = remove(&uids[0]);
    crate::support::net::eventually(
        std::time::Duration::from_secs(10),
        "the first modify is sent",
        || (dir.modify_count() == 1).then_some(()),
    )
    .await;
    let rest: Vec<_> = uids[1..].iter().map(remove).collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(dir.modify_count(), 1, "the others wait behind the first");
    slapd.signal("-CONT");
    let mut results = vec![first.await.expect("task")];
    for t in rest {
        results.push(t.await.expect("task"));
    }
    assert_all_ok(&results, &uids);
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    // One modify per value, plus one per combined modify that was refused:
    // more than 100 shows that a batch was refused and fell back.
    let modifies = dir.modify_count();
    eprintln!("100 concurrent removals, 50 absent: {modifies} modify operations");
    assert!(modifies > 100, "no combined modify was refused: {modifies}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_removals_that_would_empty_the_group_keep_the_placeholder() {
    let slapd = Slapd::start();
    let mut uids = add_people(&slapd, 0, 50).await;
    let dns: Vec<String> = uids.iter().map(|u| person(u)).collect();
    add_values(&slapd, WEB_ADMINS, "member", &dns).await;
    uids.push("dave".into());
    assert_eq!(slapd.values(WEB_ADMINS, "member").await.len(), 51);

    let dir = Arc::new(directory(&slapd.ldap_config()));
    let results = remove_all(&dir, WEB_ADMINS, &uids).await;
    assert_all_ok(&results, &uids);
    assert_eq!(
        slapd.values(WEB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    assert!(dir.list_members(&group(WEB_ADMINS)).await.unwrap().is_empty());
    eprintln!(
        "51 concurrent removals emptying a groupOfNames: {} modify operations",
        dir.modify_count()
    );

    // Without a placeholder, of two removals that would empty the group
    // exactly one is refused, and it says why.
    let two = add_people(&slapd, 50, 2).await;
    let dns: HashSet<String> = two.iter().map(|u| person(u)).collect();
    let mut ldap = slapd.admin().await;
    ldap.modify(WEB_ADMINS, vec![Mod::Replace("member".to_string(), dns)])
        .await
        .and_then(|r| r.success())
        .expect("admin modify");
    let mut without = slapd.ldap_config();
    without.placeholder_dn = None;
    let dir = Arc::new(directory(&without));
    let results = remove_all(&dir, WEB_ADMINS, &two).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(
        matches!(refused[0], DirectoryError::Refused(m) if m.contains("ldap.placeholder_dn")),
        "{}",
        refused[0]
    );
    assert_eq!(slapd.values(WEB_ADMINS, "member").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_additions_are_combined_and_tolerate_present_values() {
    let slapd = Slapd::start();
    let uids = add_people(&slapd, 0, 120).await;
    // A few are members already: their batch is refused (20) and falls back.
    let present: Vec<String> = uids.iter().step_by(30).map(|u| person(u)).collect();
    add_values(&slapd, DB_ADMINS, "member", &present).await;

    let dir = Arc::new(directory(&slapd.ldap_config()));
    let results = add_all(&dir, DB_ADMINS, &uids).await;
    assert_all_ok(&results, &uids);
    let mut want: Vec<String> = uids.iter().map(|u| person(u)).collect();
    want.push(SERVICE_DN.to_string());
    want.sort();
    assert_eq!(slapd.values(DB_ADMINS, "member").await, want);
    let first = dir.modify_count();

    // No one present: combined adds succeed as a whole.
    let more = add_people(&slapd, 120, 120).await;
    let results = add_all(&dir, DB_ADMINS, &more).await;
    assert_all_ok(&results, &more);
    let second = dir.modify_count() - first;
    eprintln!("120 concurrent adds (4 present): {first} modifies; 120 more: {second} modifies");
    assert!(second < 120, "{second} modifies for 120 additions");
    assert_eq!(slapd.values(DB_ADMINS, "member").await.len(), 241);

    // memberUid groups combine too, and may end empty.
    let results = add_all(&dir, POSIX_ADMINS, &more).await;
    assert_all_ok(&results, &more);
    assert_eq!(slapd.values(POSIX_ADMINS, "memberUid").await, more);
    let results = remove_all(&dir, POSIX_ADMINS, &more).await;
    assert_all_ok(&results, &more);
    assert!(slapd.values(POSIX_ADMINS, "memberUid").await.is_empty());
}

/// The attributes chat platforms find people by, read from the person's
/// entry: escaped lookups, absent attributes left out, unknown people and
/// bad attribute names refused.
#[tokio::test]
async fn user_attributes_read_the_persons_entry() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let wanted = ["mail".to_string(), "telephoneNumber".to_string()];
    let attrs = dir.user_attributes(&user("alice"), &wanted).await.unwrap();
    assert_eq!(
        attrs,
        [("mail".to_string(), "alice@example.org".to_string())].into()
    );
    let attrs = dir
        .user_attributes(&user("evil,+\"\\<>;"), &wanted)
        .await
        .unwrap();
    assert_eq!(attrs.get("mail").map(String::as_str), Some("evil@example.org"));
    assert!(matches!(
        dir.user_attributes(&user("nobody"), &wanted).await,
        Err(DirectoryError::NoSuchUser(_))
    ));
    assert!(matches!(
        dir.user_attributes(&user("alice"), &["mail)(uid=*".to_string()])
            .await,
        Err(DirectoryError::Refused(_))
    ));
}

/// The approvers an approval card is DMed to, against slapd: db-admins is
/// approved by `approvers`, which holds `security`, which holds carol.
#[tokio::test]
async fn eligible_approvers_expand_nested_groups_in_slapd() {
    let slapd = Slapd::start();
    let groups = group_configs();
    let ldap = LdapDirectory::new(&slapd.ldap_config(), &groups).expect("ldap directory");
    let bot = crate::support::bot::TestBot::builder()
        .wrap(|_| Arc::new(ldap))
        .policy(|p| p.groups = groups.iter().map(|g| g.to_policy()).collect())
        .build();
    let policy = bot.engine.policy().groups[0].clone();
    assert_eq!(
        bot.engine.eligible_approvers(&policy, &user("alice")).await,
        ids(&["carol"])
    );
    assert_eq!(
        bot.engine.eligible_approvers(&policy, &user("carol")).await,
        Vec::<UserId>::new(),
        "never the requester"
    );
    let carol = bot.engine.contact(&user("carol"), &["mail".to_string()]).await;
    assert_eq!(
        carol.attributes.get("mail").map(String::as_str),
        Some("carol@example.org")
    );
}

/// Moves `dn` to `rdn` under `parent` as the directory's root.
async fn root_modifydn(slapd: &Slapd, dn: &str, rdn: &str, parent: &str) {
    let mut ldap = slapd.admin().await;
    ldap.modifydn(dn, rdn, true, Some(parent))
        .await
        .and_then(|r| r.success())
        .expect("root modifydn");
    let _ = ldap.unbind().await;
}

/// Plain OpenLDAP (no refint overlay) keeps a renamed or moved user's old
/// DN in `member`. The lease recorded the user's `entryUUID`; removal finds
/// the user under their new DN, sees that the value jitbot wrote is still
/// there, and removes exactly that value, saying so.
#[tokio::test]
async fn a_user_moved_during_a_lease_loses_the_value_jitbot_wrote() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let g = group(DB_ADMINS);
    let lease = dir.membership_of(&g, &user("alice")).await.unwrap();
    assert!(
        lease
            .identity
            .as_deref()
            .is_some_and(|i| i.starts_with("entryUUID:")),
        "{lease:?}"
    );
    dir.add_membership(&lease).await.unwrap();
    let moved = format!("uid=alice,{}", "ou=services,dc=example,dc=org");
    root_modifydn(
        &slapd,
        &person("alice"),
        "uid=alice",
        "ou=services,dc=example,dc=org",
    )
    .await;
    // slapd did not rewrite the group's value.
    assert!(slapd.values(DB_ADMINS, "member").await.contains(&person("alice")));

    let note = dir.revoke_membership(&lease).await.unwrap();
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()]
    );
    let note = note.expect("the audit is told the user moved");
    assert!(note.contains(&moved), "{note}");
}

/// With the refint overlay (or an admin following the rename by hand),
/// the group holds the user's *new* DN: removal takes that value away and
/// never takes "the old value is absent" for done.
#[tokio::test]
async fn a_user_moved_during_a_lease_whose_value_followed_is_still_removed() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let g = group(DB_ADMINS);
    let lease = dir.membership_of(&g, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    let moved = "uid=alice,ou=services,dc=example,dc=org".to_string();
    root_modifydn(
        &slapd,
        &person("alice"),
        "uid=alice",
        "ou=services,dc=example,dc=org",
    )
    .await;
    // What refint does: the member value follows the entry.
    let mut root = slapd.admin().await;
    root.modify(
        DB_ADMINS,
        vec![
            Mod::Delete("member".to_string(), HashSet::from([person("alice")])),
            Mod::Add("member".to_string(), HashSet::from([moved.clone()])),
        ],
    )
    .await
    .and_then(|r| r.success())
    .expect("follow the rename");
    let _ = root.unbind().await;
    assert!(
        dir.has_membership(&lease).await.unwrap(),
        "the lease's membership, under its new DN"
    );

    let note = dir.revoke_membership(&lease).await.unwrap();
    assert_eq!(
        slapd.values(DB_ADMINS, "member").await,
        vec![SERVICE_DN.to_string()],
        "the moved user's membership outlived the lease"
    );
    assert!(note.is_some_and(|n| n.contains("renamed or moved")));
    assert!(!dir.has_membership(&lease).await.unwrap());
}

// With refint (here done by hand, as the existing refint test does), alice
// is moved during her lease and a new person is created under her old DN
// and made a standing member by an admin: the value under the old DN is the
// new person's and stays; alice's value under her new DN goes.
#[tokio::test]
async fn a_refint_move_then_a_new_person_at_the_old_dn_keeps_their_standing_membership() {
    let slapd = Slapd::start();
    let dir = directory(&slapd.ldap_config());
    let g = group(DB_ADMINS);
    let lease = dir.membership_of(&g, &user("alice")).await.unwrap();
    dir.add_membership(&lease).await.unwrap();
    let moved = "uid=alice,ou=services,dc=example,dc=org".to_string();
    root_modifydn(
        &slapd,
        &person("alice"),
        "uid=alice",
        "ou=services,dc=example,dc=org",
    )
    .await;
    let mut root = slapd.admin().await;
    // refint: the member value follows the entry.
    root.modify(
        DB_ADMINS,
        vec![
            Mod::Delete("member".to_string(), HashSet::from([person("alice")])),
            Mod::Add("member".to_string(), HashSet::from([moved.clone()])),
        ],
    )
    .await
    .and_then(|r| r.success())
    .expect("follow the rename");
    // A new person under alice's old DN, made a standing member by an admin.
    root.add(
        &person("alice"),
        vec![
            (
                "objectClass".to_string(),
                HashSet::from(["inetOrgPerson".to_string()]),
            ),
            ("uid".to_string(), HashSet::from(["alice".to_string()])),
            ("cn".to_string(), HashSet::from(["Alice Newhire".to_string()])),
            ("sn".to_string(), HashSet::from(["Newhire".to_string()])),
        ],
    )
    .await
    .and_then(|r| r.success())
    .expect("new person at the old DN");
    root.modify(
        DB_ADMINS,
        vec![Mod::Add("member".to_string(), HashSet::from([person("alice")]))],
    )
    .await
    .and_then(|r| r.success())
    .expect("standing membership of the new person");
    let _ = root.unbind().await;

    let removed = dir.revoke_membership(&lease).await;
    let left: BTreeSet<String> = slapd.values(DB_ADMINS, "member").await.into_iter().collect();
    assert!(
        left.contains(&person("alice")),
        "the new person's standing membership (not jitbot's) was removed ({removed:?}): {left:?}"
    );
    assert!(
        !left.contains(&moved),
        "alice's leased membership (under her new DN) outlived the lease ({removed:?}): {left:?}"
    );
}

/// A TCP proxy in front of slapd that, once `swallowing`, reads what
/// clients send and drops it (a link that delivers nothing), and records
/// when a client's side of a connection ends (FIN or reset).
struct SwallowingProxy {
    port: u16,
    swallowing: Arc<std::sync::atomic::AtomicBool>,
    client_ended: Arc<std::sync::atomic::AtomicUsize>,
}

impl SwallowingProxy {
    async fn start(upstream: u16) -> SwallowingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let swallowing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client_ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (sw, ended) = (swallowing.clone(), client_ended.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                });
                let (sw, ended) = (sw.clone(), ended.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 16384];
                    loop {
                        match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) if !sw.load(Ordering::SeqCst) => {
                                if server_tx.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        SwallowingProxy {
            port,
            swallowing,
            client_ended,
        }
    }
}

/// Issue 16 (brk16c finding 1): a call the engine gives up on at its
/// bound (its future dropped under `given_up_on_closes`, as the engine's
/// act-until bound does) must not leave its request on a connection that
/// stays open and is reused: the connection is reset at once, so the
/// kernel stops trying to deliver the request, and the next call opens a
/// new one.
#[tokio::test]
async fn a_call_given_up_on_closes_its_connection_instead_of_reusing_it() {
    use std::sync::atomic::Ordering;
    let slapd = Slapd::start();
    let proxy = SwallowingProxy::start(slapd.port()).await;
    let mut config = slapd.ldap_config();
    config.url = format!("ldap://127.0.0.1:{}", proxy.port);
    let dir = directory(&config);
    let m = dir
        .membership_of(&group(DB_ADMINS), &user("alice"))
        .await
        .unwrap();
    assert!(!dir.has_membership(&m).await.unwrap());
    assert_eq!(proxy.client_ended.load(Ordering::SeqCst), 0);

    proxy.swallowing.store(true, Ordering::SeqCst);
    let given_up = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        jitbot::ports::given_up_on_closes(dir.add_membership(&m)),
    )
    .await;
    assert!(
        given_up.is_err(),
        "the add cannot have been answered: {given_up:?}"
    );
    let mut closed = false;
    for _ in 0..40 {
        if proxy.client_ended.load(Ordering::SeqCst) > 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "the connection the abandoned add went out on is still open: its request could still be delivered"
    );

    proxy.swallowing.store(false, Ordering::SeqCst);
    assert!(
        !dir.has_membership(&m).await.unwrap(),
        "the next call works on a new connection, and the swallowed add never landed"
    );
}
