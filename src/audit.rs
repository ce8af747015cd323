//! Audit export formats.

use crate::store::AuditEntry;

/// CSV with a header row; fields quoted where needed (RFC 4180).
pub fn to_csv(rows: &[AuditEntry]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = String::from("seq,at,actor,action,request,lease,group,user,detail,prev\n");
    for r in rows {
        let cols = [
            r.seq.to_string(),
            r.at.to_rfc3339(),
            r.actor.clone(),
            r.action.clone(),
            r.request.clone().unwrap_or_default(),
            r.lease.clone().unwrap_or_default(),
            r.group.clone().unwrap_or_default(),
            r.user.clone().unwrap_or_default(),
            r.detail.clone(),
            r.prev.clone(),
        ];
        out.push_str(&cols.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}
