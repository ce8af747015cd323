//! Pure helpers over distinguished names and Active Directory specifics: no I/O.

/// The first RDN of `dn` as `(attribute, unescaped value)`, when it is a
/// single-valued RDN with a string value (RFC 4514). `None` for multi-valued
/// RDNs (`a=1+b=2`), hex-encoded values (`a=#04..`) and malformed input.
pub fn first_rdn(dn: &str) -> Option<(String, String)> {
    let rdn = split_unescaped(dn, ',').next()?;
    if split_unescaped(rdn, '+').nth(1).is_some() {
        return None;
    }
    let (attr, raw) = rdn.split_once('=')?;
    let attr = attr.trim();
    if attr.is_empty() || raw.starts_with('#') {
        return None;
    }
    Some((attr.to_string(), unescape_value(raw.trim_start())?))
}

/// A DN compared the way jitbot compares configured DNs with the server's:
/// case-insensitively and without spaces around separators. Good enough to
/// recognise the placeholder and configured groups; the server does the
/// exact matching in filters.
pub fn normalize(dn: &str) -> String {
    rdns(dn).join(",")
}

/// Whether `dn` lies at or below `base`, RDN by RDN (after [`normalize`]).
pub fn is_under(dn: &str, base: &str) -> bool {
    let (dn, base) = (rdns(dn), rdns(base));
    dn.len() >= base.len() && dn[dn.len() - base.len()..] == base[..]
}

fn rdns(dn: &str) -> Vec<String> {
    if dn.trim().is_empty() {
        return Vec::new();
    }
    split_unescaped(dn, ',')
        .map(|rdn| {
            split_unescaped(rdn, '+')
                .map(|ava| match ava.split_once('=') {
                    Some((a, v)) => format!("{}={}", a.trim(), v.trim()),
                    None => ava.trim().to_string(),
                })
                .collect::<Vec<_>>()
                .join("+")
                .to_lowercase()
        })
        .collect()
}

/// Splits at `sep` where it is not escaped by a backslash.
fn split_unescaped(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

/// Undoes RFC 4514 escaping: `\,` and `\2C` both give `,`.
fn unescape_value(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let next = *bytes.get(i + 1)?;
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if next.is_ascii_hexdigit() => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(next);
                i += 2;
            }
        }
    }
    // Unescaped trailing spaces are not part of the value.
    let mut s = String::from_utf8(out).ok()?;
    if !raw.ends_with("\\ ") {
        s.truncate(s.trim_end().len());
    }
    Some(s)
}

/// The `member` value that asks Active Directory for a temporary membership
/// (Windows Server 2016 "PAM" optional feature, forest level 2016): AD
/// removes the value by itself after `ttl_secs` seconds.
///
/// **Untested against a live Active Directory**: only the encoding is
/// unit-tested. It is a second lock behind jitbot's own revocation, never
/// the only one.
pub fn ad_ttl_value(dn: &str, ttl_secs: u64) -> String {
    format!("<TTL={ttl_secs},{dn}>")
}

/// Groups whose ACLs and membership Active Directory resets from
/// AdminSDHolder (SDProp), by common name.
const AD_PROTECTED: &[&str] = &[
    "Domain Admins",
    "Enterprise Admins",
    "Schema Admins",
    "Administrators",
    "Account Operators",
    "Server Operators",
    "Print Operators",
    "Backup Operators",
    "Replicator",
    "Domain Controllers",
    "Read-only Domain Controllers",
    "Enterprise Key Admins",
    "Key Admins",
];

/// Whether `dn` names one of Active Directory's AdminSDHolder-protected
/// groups (by the CN of its first RDN). Changes to such groups can be undone
/// by AD unless the service account has rights on AdminSDHolder.
pub fn is_ad_protected_group(dn: &str) -> bool {
    match first_rdn(dn) {
        Some((attr, value)) if attr.eq_ignore_ascii_case("cn") => {
            AD_PROTECTED.iter().any(|p| p.eq_ignore_ascii_case(&value))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rdn_unescapes() {
        let cases = [
            ("uid=alice,ou=people,dc=example,dc=org", Some(("uid", "alice"))),
            (r"uid=x\2Cy\2Bz,ou=people", Some(("uid", "x,y+z"))),
            (r#"cn=weird \"name\",ou=x"#, Some(("cn", r#"weird "name""#))),
            (r"cn=a\,b\\c,dc=x", Some(("cn", r"a,b\c"))),
            (r"cn=caf\C3\A9,dc=x", Some(("cn", "café"))),
            ("uid = bob ,dc=x", Some(("uid", "bob"))),
            ("cn=a+uid=b,dc=x", None),
            ("cn=#0403616263,dc=x", None),
            ("nonsense", None),
            (r"cn=dangling\", None),
        ];
        for (dn, want) in cases {
            let got = first_rdn(dn);
            let want = want.map(|(a, v)| (a.to_string(), v.to_string()));
            assert_eq!(got, want, "{dn}");
        }
    }

    #[test]
    fn normalize_and_under() {
        assert_eq!(
            normalize("CN=Jitbot, OU=Services,dc=Example,DC=org"),
            "cn=jitbot,ou=services,dc=example,dc=org"
        );
        assert!(is_under("uid=a,ou=People,dc=x", "ou=people, dc=x"));
        assert!(!is_under("uid=a,ou=peoplex,dc=x", "ou=people,dc=x"));
        assert!(!is_under(r"uid=a\,ou=people,dc=x", "ou=people,dc=x"));
        assert!(is_under("dc=x", "dc=x"));
    }

    #[test]
    fn ad_ttl_encoding() {
        assert_eq!(
            ad_ttl_value("CN=Alice,OU=People,DC=corp,DC=example", 3600),
            "<TTL=3600,CN=Alice,OU=People,DC=corp,DC=example>"
        );
        assert_eq!(
            ad_ttl_value(r"CN=Smith\, J,DC=x", 0),
            r"<TTL=0,CN=Smith\, J,DC=x>"
        );
    }

    #[test]
    fn recognises_protected_groups() {
        for dn in [
            "CN=Domain Admins,CN=Users,DC=corp,DC=example",
            "cn=enterprise admins,cn=users,dc=corp,dc=example",
            "CN=Administrators,CN=Builtin,DC=corp,DC=example",
            "CN=Read-only Domain Controllers,CN=Users,DC=x",
            "CN=Key Admins,CN=Users,DC=x",
            "CN=Backup Operators,CN=Builtin,DC=x",
        ] {
            assert!(is_ad_protected_group(dn), "{dn}");
        }
        for dn in [
            "CN=Domain Admins Helpers,CN=Users,DC=x",
            "CN=DB Admins,OU=Groups,DC=x",
            "OU=Domain Admins,DC=x",
            "CN=Users,CN=Domain Admins,DC=x",
            "",
        ] {
            assert!(!is_ad_protected_group(dn), "{dn}");
        }
    }
}
