//! Active Directory for real: a Samba AD domain controller per test
//! (`support::samba`), jitbot's LDAP directory and the real `jitbot` binary
//! against it.

use crate::support::samba::{self, SambaDc};
use ldap3::Scope;

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
    assert!(dc.values(samba::DB_APPROVERS, "member").await == vec![samba::DBA_LEADS.to_string()]);
}
