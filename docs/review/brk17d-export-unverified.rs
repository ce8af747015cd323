// Review brk17d, finding 4 (Medium), not fixed in session 8: `audit export`
// checks no hash, so a record altered in the archive once the store no
// longer holds it is exported as the trail; `audit verify --archive`
// names it. A fix: check the chain over the bytes export reads (as
// `verify_audit_with_archive` does, with the head read under the writer
// lock), without reading the archive twice (retention.rs's race test
// feeds its FIFO once). To run it, put it back in tests/it/archive_edges.rs.

/// Records 1..=39 are archived and gone from the store. Someone who can
/// write the archive directory rewrites record 14 in the file (same seq,
/// same place, same file name). `audit verify --archive` sees the broken
/// chain; `audit export` (`GET /admin/audit`) hands out the altered record
/// as the trail, because it checks no hash: it only compares records the
/// store still holds (brk17c finding 2's fix), and here it holds none.
#[tokio::test]
async fn brk17d_audit_export_hands_out_an_altered_record_only_the_archive_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let s = archived_store(tmp.path()).await;
    // Files are named audit-<first>-<last>.jsonl.gz.
    let (path, first) = std::fs::read_dir(&s.archive_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let range = name.strip_prefix("audit-")?.strip_suffix(".jsonl.gz")?;
            let (a, b) = range.split_once('-')?;
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            (a <= 14 && 14 <= b).then_some((p, a))
        })
        .expect("the file holding record 14");
    let mut lines = read_lines(&path);
    let at = (14 - first) as usize;
    assert!(lines[at].contains("\"record 14\""), "{}", lines[at]);
    lines[at] = lines[at].replace("\"record 14\"", "\"record 14: bob approved his own request\"");
    write_lines(&path, &lines);
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    let verified = store.verify_audit_with_archive(&s.archive_dir, None);
    assert!(
        matches!(verified, Ok(AuditCheck::Broken { .. })),
        "control: verify --archive sees the altered record: {verified:?}"
    );
    let exported = store.audit_with_archive(Some(&s.archive_dir));
    if let Ok(all) = &exported {
        let fourteen = all.iter().find(|e| e.seq == 14).map(|e| e.detail.clone());
        panic!(
            "audit export returned the whole trail ({} records) with record 14 altered in {} ({fourteen:?}), \
             which verify --archive calls broken ({verified:?}). Export must check the chain (prev hashes, \
             and the MAC when keyed) of what it hands out and refuse, naming the record and file",
            all.len(),
            path.display()
        );
    }
}


fn read_lines(path: &Path) -> Vec<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    for l in lines {
        gz.write_all(l.as_bytes()).unwrap();
        gz.write_all(b"\n").unwrap();
    }
    gz.finish().unwrap();
}
