//! The audit archive: audit records older than `[store] retain` moved out
//! of the store into gzip-compressed JSONL files, one stored record per
//! line, byte for byte as the store held it (sequence, `prev` link, HMAC
//! tag when keyed), so the chain runs on from the archive into the store.
//!
//! Files are named `audit-<first seq>-<last seq>.jsonl.gz` (20 digits each,
//! so names sort in chain order). A file is written under a temporary name,
//! synced, renamed and its directory synced *before* its records leave the
//! store; the store then remembers, in `meta/audit_base`, the last archived
//! record and its hash (`SEQ:HASH`), so `jitbot audit verify` still checks
//! the store alone from there, and `jitbot audit verify --archive DIR`
//! checks archive and store end to end. A crash between the two leaves the
//! records in both places; the next pass ([`Store::reconcile_archive`])
//! checks they are the same bytes and finishes the move.

use super::audit::{audit_chain, Keyed, HEAD_MAC, KEYED_SINCE};
use super::kv::TreeId;
use super::records::StoredAudit;
use super::{Anchor, AuditCheck, AuditEntry, Store, StoreError, AUDIT_HEAD};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// `meta` key of the last archived record and its hash (`SEQ:HASH`);
/// absent while nothing has been archived.
pub(super) const AUDIT_BASE: &[u8] = b"audit_base";

const PREFIX: &str = "audit-";
const SUFFIX: &str = ".jsonl.gz";

/// One archive file and the records its name says it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveFile {
    pub path: PathBuf,
    pub first: u64,
    pub last: u64,
}

impl ArchiveFile {
    /// The file's name, for messages.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn archive_error(what: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("audit archive: {what}"))
}

fn file_name(first: u64, last: u64) -> String {
    format!("{PREFIX}{first:020}-{last:020}{SUFFIX}")
}

/// Parses `audit-<first>-<last>.jsonl.gz`; `None` for any other name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let range = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (first, last) = range.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// The archive files in `dir` in chain order; an absent directory holds none.
pub fn list(dir: &Path) -> Result<Vec<ArchiveFile>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(archive_error(format!("cannot read {}: {e}", dir.display()))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| archive_error(format!("cannot read {}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((first, last)) = parse_name(&name) {
            files.push(ArchiveFile {
                path: entry.path(),
                first,
                last,
            });
        }
    }
    files.sort_by_key(|f| (f.first, f.last));
    Ok(files)
}

/// The highest record the archive files hold (0 for none).
pub(super) fn highest_archived(files: &[ArchiveFile]) -> u64 {
    files.iter().map(|f| f.last).max().unwrap_or(0)
}

/// Writes `records` (seq, stored bytes; consecutive) as one archive file
/// and makes it durable: temporary name, fsync, rename, fsync of the
/// directory. Returns the file.
pub(super) fn write_file(dir: &Path, records: &[(u64, Vec<u8>)]) -> Result<ArchiveFile, StoreError> {
    let (Some((first, _)), Some((last, _))) = (records.first(), records.last()) else {
        return Err(archive_error("nothing to archive"));
    };
    let io =
        |what: &str, e: std::io::Error| archive_error(format!("cannot {what} in {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| io("create the directory", e))?;
    let name = file_name(*first, *last);
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(|e| io("create a file", e))?;
    let mut gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::default());
    for (_, bytes) in records {
        gz.write_all(bytes).map_err(|e| io("write", e))?;
        gz.write_all(b"\n").map_err(|e| io("write", e))?;
    }
    let file = gz
        .finish()
        .map_err(|e| io("write", e))?
        .into_inner()
        .map_err(|e| io("write", e.into_error()))?;
    file.sync_all().map_err(|e| io("sync a file", e))?;
    drop(file);
    let path = dir.join(&name);
    // jitbot never writes the same records twice (a crash after the rename
    // is finished by `reconcile_archive`, not rewritten), so a file of this
    // name with other bytes belongs to another store sharing the directory:
    // refuse rather than replace its records.
    if let Ok(existing) = std::fs::read(&path) {
        let mine = std::fs::read(&tmp).map_err(|e| io("read a file", e))?;
        let _ = std::fs::remove_file(&tmp);
        if existing != mine {
            return Err(archive_error(format!(
                "{} already exists in {} with other records, so it was left as it is and nothing was \
                 archived: is another jitbot store archiving into this directory? Give each store its own \
                 store.archive_dir",
                name,
                dir.display()
            )));
        }
    } else {
        std::fs::rename(&tmp, &path).map_err(|e| io("rename a file", e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the directory", e))?;
    Ok(ArchiveFile {
        path,
        first: *first,
        last: *last,
    })
}

/// Checks that jitbot can write archive files in `dir`: creates it if
/// needed, then writes, syncs and removes a probe file. `jitbot
/// check-config` and `jitbot run`'s start-up call it when retention is on,
/// so a directory no pass could ever write is named before the first pass.
pub fn check_writable(dir: &Path) -> Result<(), StoreError> {
    let fix = "create it and give jitbot's user write access to it (under systemd's \
               ProtectSystem=strict, list it in ReadWritePaths=), or set store.archive_dir to a \
               directory jitbot can write";
    let io = |what: &str, e: std::io::Error| {
        archive_error(format!("cannot {what} in {}: {e}; {fix}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create the directory", e))?;
    let probe = dir.join(format!(".{PREFIX}write-check-{}.tmp", std::process::id()));
    let written = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"jitbot write check\n").and_then(|()| f.sync_all()));
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| io("write a file", e))?;
    removed.map_err(|e| io("remove a file", e))
}

/// Removes temporary files a pass interrupted by a crash left behind (their
/// records are still in the store).
pub(super) fn remove_leftovers(dir: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())
                .map_err(|e| archive_error(format!("cannot remove {}: {e}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// One archived record: where it is, its sequence number, its stored bytes.
pub struct Archived {
    /// Index into the file list the reader was made with.
    pub file: usize,
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// Reads the records of archive files in order, each once. An unreadable
/// file, a line that is not an audit record, a record repeated or out of
/// order in a file, or a file whose records are not the range its name
/// says, ends the reading with an error naming the file.
///
/// Files whose ranges overlap are legitimate only as exact copies: a
/// leader deposed between writing a file and removing its records leaves
/// a file whose records the next leader archives again, in a file of
/// another range. A record already read from an earlier file is compared
/// with that copy and skipped; one that differs ends the reading, naming
/// both files.
pub struct Reader<'a> {
    files: std::borrow::Cow<'a, [ArchiveFile]>,
    next_file: usize,
    current: Option<(usize, std::io::Split<BufReader<MultiGzDecoder<std::fs::File>>>)>,
    /// (first, last) seq read from the current file.
    seen: Option<(u64, u64)>,
    /// The highest seq handed out so far.
    covered: Option<u64>,
    /// Records handed out that a later file's range also covers: seq →
    /// (file index, bytes), to compare that file's copies with.
    copies: BTreeMap<u64, (usize, Vec<u8>)>,
    done: bool,
}

impl<'a> Reader<'a> {
    pub fn new(files: &'a [ArchiveFile]) -> Self {
        Reader::with(std::borrow::Cow::Borrowed(files))
    }

    /// A reader that owns its file list.
    pub fn owned(files: Vec<ArchiveFile>) -> Reader<'static> {
        Reader::with(std::borrow::Cow::Owned(files))
    }

    fn with(files: std::borrow::Cow<'a, [ArchiveFile]>) -> Self {
        Reader {
            files,
            next_file: 0,
            current: None,
            seen: None,
            covered: None,
            copies: BTreeMap::new(),
            done: false,
        }
    }

    fn fail(&mut self, file: usize, what: String) -> Option<Result<Archived, StoreError>> {
        self.done = true;
        Some(Err(StoreError::Corrupt {
            key: format!("audit archive file {}", self.files[file].path.display()),
            error: what,
        }))
    }
}

impl Iterator for Reader<'_> {
    type Item = Result<Archived, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let Some((ix, lines)) = self.current.as_mut() else {
                let ix = self.next_file;
                let file = self.files.get(ix)?;
                self.next_file += 1;
                // Copies kept for an earlier file's overlap are done with.
                self.copies = self.copies.split_off(&file.first);
                match std::fs::File::open(&file.path) {
                    Ok(f) => {
                        let lines = BufReader::new(MultiGzDecoder::new(f)).split(b'\n');
                        self.current = Some((ix, lines));
                        self.seen = None;
                        continue;
                    }
                    Err(e) => return self.fail(ix, format!("cannot open it: {e}")),
                }
            };
            let ix = *ix;
            match lines.next() {
                None => {
                    self.current = None;
                    let file = &self.files[ix];
                    if self.seen != Some((file.first, file.last)) {
                        let held = match self.seen {
                            Some((a, b)) => format!("records {a} to {b}"),
                            None => "no records".into(),
                        };
                        return self.fail(
                            ix,
                            format!(
                                "its name says records {} to {} but it holds {held}: records were removed from it or it was renamed",
                                file.first, file.last
                            ),
                        );
                    }
                }
                Some(Err(e)) => return self.fail(ix, format!("it is damaged (not a whole gzip file): {e}")),
                Some(Ok(line)) if line.is_empty() => {}
                Some(Ok(line)) => {
                    let seq = match serde_json::from_slice::<StoredAudit>(&line) {
                        Ok(stored) => stored.into_entry().seq,
                        Err(e) => {
                            let after = self.seen.map(|(_, b)| b).unwrap_or(0);
                            return self.fail(
                                ix,
                                format!("the line after record {after} is not an audit record: {e}"),
                            );
                        }
                    };
                    if let Some((_, before)) = self.seen.filter(|(_, before)| seq <= *before) {
                        return self.fail(
                            ix,
                            format!(
                                "record {seq} comes after record {before} in it: records are repeated or out of \
                                 order, and jitbot writes each once, in order, so the file was altered. Put back \
                                 the file from a copy of the archive"
                            ),
                        );
                    }
                    self.seen = Some(match self.seen {
                        None => (seq, seq),
                        Some((a, _)) => (a, seq),
                    });
                    if self.covered.is_some_and(|c| seq <= c) {
                        match self.copies.get(&seq) {
                            Some((_, first)) if *first == line => continue,
                            Some((earlier, _)) => {
                                let what = format!(
                                    "record {seq} in it differs from the copy of record {seq} in {}: jitbot \
                                     writes the same bytes whenever it archives a record again, so one of them \
                                     was altered. Find out which file belongs (`audit verify --archive` on a copy \
                                     of the directory holding only one of them) and move the other out",
                                    self.files[*earlier].name()
                                );
                                return self.fail(ix, what);
                            }
                            // Below the file's own first record: its name
                            // check at the end would say so; say it now.
                            None => {
                                let file = &self.files[ix];
                                return self.fail(
                                    ix,
                                    format!(
                                        "it holds record {seq}, outside the records {} to {} its name says",
                                        file.first, file.last
                                    ),
                                );
                            }
                        }
                    }
                    self.covered = Some(seq);
                    // Files are in (first, last) order: the next one has
                    // the lowest first record of those after this one.
                    if self.files.get(ix + 1).is_some_and(|next| next.first <= seq) {
                        self.copies.insert(seq, (ix, line.clone()));
                    }
                    return Some(Ok(Archived {
                        file: ix,
                        seq,
                        bytes: line,
                    }));
                }
            }
        }
    }
}

/// Parses `meta/audit_base`; absent is the empty chain.
pub(super) fn parse_base(stored: Option<&[u8]>) -> Result<Anchor, StoreError> {
    let Some(bytes) = stored else {
        return Ok(Anchor::GENESIS);
    };
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.parse::<Anchor>().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: "meta/audit_base".into(),
            error:
                "the record of where the audit archive ends is unreadable; restore the store from a backup"
                    .into(),
        })
}

impl Store {
    /// Where the store's audit records start: the last archived record and
    /// its hash ([`Anchor::GENESIS`] while nothing was archived).
    pub fn audit_base(&self) -> Result<Anchor, StoreError> {
        parse_base(self.tree(TreeId::Meta).get(AUDIT_BASE)?.as_deref())
    }

    /// Names the audit archive directory of this jitbot (`[store]
    /// archive_dir`), which `audit export` reads. Set once.
    pub fn set_archive_dir(&self, dir: PathBuf) {
        let _ = self.inner.archive_dir.set(dir);
    }

    /// The audit archive directory, when retention is on.
    pub fn archive_dir(&self) -> Option<&Path> {
        self.inner.archive_dir.get().map(PathBuf::as_path)
    }

    /// Checks the archive in `dir` and the store as one chain, from record 1
    /// to the store's head (and, given one, a published anchor anywhere in
    /// it). A problem names the archive file (or the store) it is in.
    pub fn verify_audit_with_archive(
        &self,
        dir: &Path,
        anchor: Option<&Anchor>,
    ) -> Result<AuditCheck, StoreError> {
        let files = list(dir)?;
        // The head, its MAC and the keyed-since marker as of one moment
        // (under the writer lock, briefly: the archive is read without it);
        // store records appended after it are left out.
        let (head, head_mac, keyed_since) = {
            let _guard = self.writer()?;
            (
                self.tree(TreeId::Meta).get(AUDIT_HEAD)?,
                self.tree(TreeId::Meta).get(HEAD_MAC)?,
                self.tree(TreeId::Meta).get(KEYED_SINCE)?,
            )
        };
        let head_seq = super::audit::parse_head(head.as_deref())?.seq;
        let keyed = match self.inner.audit_key.get() {
            Some(key) => Keyed::With {
                key,
                keyed_since: keyed_since.as_deref(),
                head_mac: head_mac.as_deref(),
            },
            None => Keyed::Missing,
        };
        // The highest record in any file: a late copy may reach past files
        // sorted after it.
        let last_archived = highest_archived(&files);
        // Records a crash left in both places must be the same bytes.
        let overlap = self.overlap(&files)?;
        // Where the last two records came from: a broken chain is reported
        // at the current record or the one before it.
        let sources = std::cell::RefCell::new([(0u64, String::new()), (0u64, String::new())]);
        let note = |seq: u64, source: String| {
            let mut s = sources.borrow_mut();
            s[0] = std::mem::replace(&mut s[1], (seq, source));
        };
        // The archive, then the store. A pass running meanwhile moves
        // records from the store to a new archive file (written before they
        // leave the store): when the store's records jump past the next one
        // expected, the archive is listed again and the files that appeared
        // are read, so the check sees every record once.
        enum Part {
            Archive(Reader<'static>),
            Store(sled::Iter),
        }
        // Held while the chain is read: a mirror reload's new generation
        // of the trees replaces it, and this one is dropped only after.
        let audit_tree = self.tree(TreeId::Audit);
        let mut part = Part::Archive(Reader::owned(files.clone()));
        let mut next = 1u64;
        let mut archived_to = last_archived;
        let chain = std::iter::from_fn(|| loop {
            match &mut part {
                Part::Archive(reader) => match reader.next() {
                    // The whole store the first time (records a crash left
                    // in both places are compared); after a re-listing, on
                    // from the next record.
                    None if archived_to > last_archived => {
                        part = Part::Store(audit_tree.range(next.to_be_bytes()..))
                    }
                    None => part = Part::Store(audit_tree.iter()),
                    Some(Err(e)) => return Some(Err(e)),
                    Some(Ok(rec)) if rec.seq < next => {}
                    Some(Ok(rec)) => {
                        let name = reader.files[rec.file].name();
                        note(rec.seq, format!("archive file {name}"));
                        next = rec.seq + 1;
                        return Some(Ok((rec.seq.to_be_bytes().to_vec(), rec.bytes)));
                    }
                },
                Part::Store(iter) => {
                    let (k, v) = match iter.next()? {
                        Ok(kv) => kv,
                        Err(e) => return Some(Err(StoreError::from(e))),
                    };
                    let seq = <[u8; 8]>::try_from(k.as_ref())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    if seq > head_seq {
                        return None;
                    }
                    if seq != 0 && seq <= archived_to {
                        if seq > last_archived {
                            // Read from a file that appeared while checking.
                            continue;
                        }
                        match overlap.get(&seq) {
                            Some((_, bytes)) if bytes.as_slice() == v.as_ref() => continue,
                            Some((file, _)) => {
                                return Some(Err(StoreError::Corrupt {
                                    key: format!("audit record {seq}"),
                                    error: format!(
                                        "it is in the store and in the archive ({}), and the two differ",
                                        files[*file].name()
                                    ),
                                }))
                            }
                            None => return Some(Err(StoreError::Corrupt {
                                key: format!("audit record {seq}"),
                                error:
                                    "it is in the store, and the archive files that should hold it too do not"
                                        .into(),
                            })),
                        }
                    }
                    if seq > next {
                        let appeared = match list(dir) {
                            Ok(all) => all.into_iter().filter(|f| f.last >= next).collect::<Vec<_>>(),
                            Err(e) => return Some(Err(e)),
                        };
                        if appeared.first().is_some_and(|f| f.first <= next) {
                            archived_to = archived_to.max(highest_archived(&appeared));
                            part = Part::Archive(Reader::owned(appeared));
                            continue;
                        }
                    }
                    note(seq, "the store".into());
                    next = seq + 1;
                    return Some(Ok((k.to_vec(), v.to_vec())));
                }
            }
        });
        let check = audit_chain(&Anchor::GENESIS, chain, head.as_deref(), keyed, anchor)?;
        Ok(match check {
            AuditCheck::Broken { seq, mut problem } => {
                let sources = sources.borrow();
                if let Some((_, source)) = sources.iter().rev().find(|(s, src)| *s == seq && !src.is_empty())
                {
                    problem = format!("{problem} (in {source})");
                }
                if problem.starts_with("sequence jumps") {
                    problem.push_str(": an archive file is missing, or records were removed");
                }
                AuditCheck::Broken { seq, problem }
            }
            intact => intact,
        })
    }

    /// The records of archive files that the store still holds (a pass
    /// stopped between writing a file and removing its records, or a backup
    /// from before a pass was restored next to the archive): every file
    /// reaching past the store's first record is read.
    fn overlap(&self, files: &[ArchiveFile]) -> Result<BTreeMap<u64, (usize, Vec<u8>)>, StoreError> {
        let mut out = BTreeMap::new();
        let first_held = match self.tree(TreeId::Audit).first()? {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            None => return Ok(out),
        };
        // Not a binary search: with a late copy in the archive, the files'
        // last records do not ascend.
        let from = files
            .iter()
            .position(|f| f.last >= first_held)
            .unwrap_or(files.len());
        let tail = &files[from..];
        for rec in Reader::new(tail) {
            let rec = rec?;
            if rec.seq >= first_held {
                out.insert(rec.seq, (from + rec.file, rec.bytes));
            }
        }
        Ok(out)
    }

    /// The audit trail from the archive in `dir` (when given) and then the
    /// store, in order, for `jitbot audit export`.
    ///
    /// A pass running meanwhile moves records from the store to a new
    /// archive file (written before they leave the store): when the store no
    /// longer holds the next record, the archive is listed again and the
    /// files that appeared are read. Records that are in neither (no archive
    /// given, or the wrong one) make it fail, naming them, rather than
    /// export part of the trail as if it were the whole.
    pub fn audit_with_archive(&self, dir: Option<&Path>) -> Result<Vec<AuditEntry>, StoreError> {
        let mut files = match dir {
            Some(dir) => list(dir)?,
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let mut next = 1u64;
        // Records a crash left in both places (a pass stopped between its
        // file and the removal) must be the same bytes, as verify checks.
        let first_held = match self.tree(TreeId::Audit).first()? {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes),
            None => u64::MAX,
        };
        loop {
            for rec in Reader::new(&files) {
                let rec = rec?;
                if rec.seq >= first_held {
                    let held = self.tree(TreeId::Audit).get(rec.seq.to_be_bytes())?;
                    if held.is_some_and(|held| held.as_ref() != rec.bytes.as_slice()) {
                        return Err(StoreError::Corrupt {
                            key: format!("audit record {}", rec.seq),
                            error: format!(
                                "it is in the store and in the archive ({}), and the two differ, so nothing \
                                 was exported; `jitbot audit verify --archive DIR` checks which one the chain \
                                 holds",
                                files[rec.file].name()
                            ),
                        });
                    }
                }
                // Records read from the store before a pass moved them
                // into a file that appeared since.
                if rec.seq < next {
                    continue;
                }
                if rec.seq > next {
                    let range = match rec.seq - 1 {
                        last if last == next => format!("audit record {next} is"),
                        last => format!("audit records {next} to {last} are"),
                    };
                    return Err(StoreError::Invariant(format!(
                        "{range} missing from the audit archive: the next record there, {}, is in {}. An \
                         archive file is missing or records were removed from one; `jitbot audit verify \
                         --archive DIR` says where. Put the files back from a copy of the archive",
                        rec.seq,
                        files[rec.file].name()
                    )));
                }
                let stored: StoredAudit = super::decode(&rec.seq.to_be_bytes(), &rec.bytes)?;
                next = rec.seq + 1;
                out.push(stored.into_entry());
            }
            let mut gap = None;
            for entry in self.audit(next) {
                let entry = entry?;
                if entry.seq != next {
                    gap = Some(entry.seq);
                    break;
                }
                next += 1;
                out.push(entry);
            }
            let Some(found) = gap else {
                return Ok(out);
            };
            let appeared: Vec<ArchiveFile> = match dir {
                Some(dir) => list(dir)?.into_iter().filter(|f| f.last >= next).collect(),
                None => Vec::new(),
            };
            if appeared.first().is_none_or(|f| f.first > next) {
                let range = format!("audit records {next} to {}", found - 1);
                return Err(StoreError::Invariant(match dir {
                    None => format!(
                        "{range} are not in the store: they were moved to the audit archive. \
                         Pass `--archive DIR` naming the directory that holds them ([store] archive_dir)"
                    ),
                    Some(dir) => format!(
                        "{range} are in neither the store nor the audit archive in {}: archive files are missing. \
                         Pass `--archive DIR` naming the directory that holds them, or put the files back",
                        dir.display()
                    ),
                }));
            }
            files = appeared;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_the_same_name_with_other_records_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ours = vec![(1, b"{\"seq\":1}".to_vec()), (2, b"{\"seq\":2}".to_vec())];
        let file = write_file(dir, &ours).unwrap();
        let written = std::fs::read(&file.path).unwrap();
        // The same records again (a pass repeated): the file stays, no error.
        assert_eq!(write_file(dir, &ours).unwrap(), file);
        // Another store's records 1 and 2: refused, ours kept as they were.
        let theirs = vec![(1, b"{\"seq\":1,\"x\":1}".to_vec()), (2, b"{\"seq\":2}".to_vec())];
        let err = write_file(dir, &theirs).unwrap_err().to_string();
        assert!(err.contains("another jitbot store"), "{err}");
        assert_eq!(std::fs::read(&file.path).unwrap(), written);
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![file.name()], "no temporary file is left behind");
    }

    #[test]
    fn check_writable_names_the_directory_and_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = tmp.path().join("archive");
        check_writable(&ok).unwrap();
        assert_eq!(std::fs::read_dir(&ok).unwrap().count(), 0, "the probe is removed");
        let blocker = tmp.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = check_writable(&blocker.join("archive")).unwrap_err().to_string();
        assert!(
            err.contains("archive_dir") && err.contains("ReadWritePaths"),
            "{err}"
        );
    }
}
