//! Retention (`[store] retain`): ended leases and finished requests older
//! than the retention period are pruned, and audit records older than it
//! move to the archive (`archive.rs`).
//!
//! A pass works in batches of at most [`RetentionSettings::batch`] records:
//! each batch is re-checked and committed under the writer lock and
//! followed by a yield, so a revocation waits for at most one small batch,
//! never for a whole pass. Pruned requests and leases get no disk sync of
//! their own (the next commit's covers them; a crash only means the next
//! pass removes them again); archived audit records are flushed per batch.
//! The pass's long reads — the outbox scan (once per pass), the records of
//! an archive file, the file itself — run on tokio's blocking pool, never
//! on a runtime thread a revocation's task may be queued on. Nothing live
//! is pruned: not a lease that has not ended, nor a request that is pending
//! or awaiting break-glass review, nor anything with a timer or named by a
//! notice still in the outbox.

use super::archive::{self, AUDIT_BASE};
use super::kv::TreeId;
use super::records::{StoredAudit, StoredLease, StoredRequest};
use super::timers::{index_key, TimerKind};
use super::{decode, read_lease, LeaseRecord, OutboxItem, RequestRecord, Store, StoreError};
use jitbot_core::request::RequestKind;
use jitbot_core::{AccessRequest, Instant, Lease, LeaseId, LeaseState, RequestState, Span};
use sled::transaction::ConflictableTransactionError;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// How retention runs.
#[derive(Clone, Debug)]
pub struct RetentionSettings {
    /// Records older than this are pruned or archived.
    pub retain: Span,
    /// Where audit records go (`[store] archive_dir`).
    pub archive_dir: PathBuf,
    /// Most records removed in one commit.
    pub batch: usize,
    /// Most audit records in one archive file.
    pub archive_chunk: usize,
    /// Audit records wait until the oldest is this far past `retain` (or a
    /// whole chunk is ready) before they are archived, so files hold about a
    /// day each rather than one per pass.
    pub archive_after: Span,
    /// Time between passes.
    pub every: Duration,
}

impl RetentionSettings {
    /// The defaults: batches of 100, files of at most 100,000 records or
    /// about a day, a pass every 10 minutes.
    pub fn new(retain: Span, archive_dir: PathBuf) -> Self {
        RetentionSettings {
            retain,
            archive_dir,
            batch: 100,
            archive_chunk: 100_000,
            archive_after: Span::from_hours(24),
            every: Duration::from_secs(600),
        }
    }
}

/// What one pass removed from the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub leases: u64,
    pub requests: u64,
    /// Audit records moved to the archive.
    pub audit: u64,
}

/// What keeps a record in the store whatever its age.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holds {
    /// A timer is set for it.
    pub timer: bool,
    /// A notice or card in the outbox names it.
    pub outbox: bool,
    /// A break-glass grant not yet acknowledged (the request, or the lease
    /// it granted).
    pub review: bool,
}

impl Holds {
    fn any(self) -> bool {
        self.timer || self.outbox || self.review
    }
}

/// What became of the lease (or leases) a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseFate {
    /// The request names no lease.
    NoLease,
    /// Its lease has not ended.
    Live,
    /// Its lease has ended.
    Ended,
    /// Its lease was pruned already.
    Gone,
}

/// Whether an ended lease may be pruned: ended before `cutoff` and held by
/// nothing. A lease that has not ended never is.
pub fn lease_prunable(lease: &Lease, cutoff: Instant, holds: Holds) -> bool {
    // Leases from before `ended_at` was kept: their latest possible end.
    let ended = lease.ended_at.unwrap_or(lease.latest_end);
    lease.state == LeaseState::Ended && ended < cutoff && !holds.any()
}

/// Whether a request may be pruned: decided before `cutoff`, not pending,
/// not awaiting review, its lease (if any) ended or gone, held by nothing.
pub fn request_prunable(request: &AccessRequest, cutoff: Instant, lease: LeaseFate, holds: Holds) -> bool {
    let decided = request.decided_at.unwrap_or(request.decide_by);
    request.state != RequestState::Pending
        && !request.awaits_review()
        && decided < cutoff
        && lease != LeaseFate::Live
        && !holds.any()
}

/// The first outbox entry id not yet handed out. Read under the writer
/// lock (every commit adding entries holds it, and entry ids grow with each
/// commit), so every entry below it is committed and a later one is at or
/// above it.
fn outbox_mark(store: &Store) -> Result<u64, StoreError> {
    let _guard = store.writer()?;
    super::counter(&store.tree(TreeId::Meta), super::NEXT_OUTBOX)
}

/// The ids (requests and leases) named by outbox entries still to deliver
/// whose entry id is `from` or later.
fn outbox_references(store: &Store, from: u64) -> Result<BTreeSet<String>, StoreError> {
    let mut out = BTreeSet::new();
    for entry in store.tree(TreeId::Outbox).range(from.to_be_bytes()..) {
        let (k, v) = entry?;
        let item = super::outbox::upgrade(decode(&k, &v)?).item;
        match item {
            OutboxItem::PostApproval { request } | OutboxItem::UpdateApproval { request } => {
                out.insert(request.to_string());
            }
            OutboxItem::Send { notice } => {
                for action in &notice.buttons {
                    // `jit:<verb>:<id>`
                    if let Some((_, id)) = action.id().rsplit_once(':') {
                        out.insert(id.to_string());
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The ids outbox entries name: those a pass collected once, without the
/// writer lock, from the entries below a mark, and (under the lock, when
/// removing) those of entries added since. An entry delivered since the
/// scan still counts: that only keeps a record one pass longer.
struct OutboxRefs<'a> {
    scanned: &'a BTreeSet<String>,
    fresh: BTreeSet<String>,
}

impl OutboxRefs<'_> {
    fn contains(&self, id: &str) -> bool {
        self.scanned.contains(id) || self.fresh.contains(id)
    }
}

fn has_timer(store: &Store, id: &str) -> Result<bool, StoreError> {
    for kind in [
        TimerKind::Grant,
        TimerKind::Expire,
        TimerKind::Revoke,
        TimerKind::RequestTimeout,
        TimerKind::Warn,
        TimerKind::Recheck,
        TimerKind::RecheckRemoval,
    ] {
        if store.tree(TreeId::TimerIx).contains_key(index_key(kind, id))? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl Store {
    /// One retention pass at `now`: prunes old requests and ended leases,
    /// finishes an archive move a crash interrupted, and archives old audit
    /// records. Each of the three runs even when another failed (an
    /// unwritable archive directory stops no pruning); the first error is
    /// returned. Counts what it removed in the metrics as it goes, and a
    /// failed pass in `jitbot_retention_failures_total`: here, so that the
    /// background loop of either store (sled's [`run`], a replica's on the
    /// leader) counts it.
    pub async fn prune(&self, now: Instant, settings: &RetentionSettings) -> Result<Pruned, StoreError> {
        let pass = self.prune_pass(now, settings).await;
        if pass.is_err() {
            crate::metrics::retention_failed();
        }
        pass
    }

    async fn prune_pass(&self, now: Instant, settings: &RetentionSettings) -> Result<Pruned, StoreError> {
        self.check_healthy()?;
        let cutoff = settings.retain.before(now);
        // One scan of the outbox per pass, shared by both trees.
        let outbox = self
            .off_runtime(|store| Ok((outbox_mark(store)?, outbox_references(store, 0)?)))
            .await;
        let (requests, leases) = match outbox {
            Ok((mark, scanned)) => (
                self.prune_requests(cutoff, settings.batch, (&scanned, mark))
                    .await,
                self.prune_leases(cutoff, settings.batch, (&scanned, mark)).await,
            ),
            // Nothing is pruned without knowing what the outbox still names.
            Err(e) => (Err(e), Ok(0)),
        };
        let audit = self.archive_audit(cutoff, settings).await;
        Ok(Pruned {
            requests: requests?,
            leases: leases?,
            audit: audit?,
        })
    }

    /// Runs `work` (a scan of a whole tree, archive file I/O) on tokio's
    /// blocking pool: on a runtime worker it would stall every task queued
    /// there — a revocation's commit included — for as long as it takes.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| StoreError::Io(format!("retention task failed: {e}")))?
    }

    fn lease_fate(&self, id: &LeaseId) -> Result<LeaseFate, StoreError> {
        Ok(match read_lease(&self.tree(TreeId::Leases), id)? {
            None => LeaseFate::Gone,
            Some(rec) if rec.lease.state == LeaseState::Ended => LeaseFate::Ended,
            Some(_) => LeaseFate::Live,
        })
    }

    /// The fate of the leases a request names (its grant, or the lease it
    /// extends): live if any is.
    fn request_lease_fate(&self, rec: &RequestRecord) -> Result<LeaseFate, StoreError> {
        let mut fate = LeaseFate::NoLease;
        let extends = match &rec.request.kind {
            RequestKind::Extend { lease } => Some(lease),
            RequestKind::Grant => None,
        };
        for id in rec.lease.iter().chain(extends) {
            match self.lease_fate(id)? {
                LeaseFate::Live => return Ok(LeaseFate::Live),
                f if fate == LeaseFate::NoLease || f == LeaseFate::Ended => fate = f,
                _ => {}
            }
        }
        Ok(fate)
    }

    fn request_is_prunable(
        &self,
        rec: &RequestRecord,
        cutoff: Instant,
        outbox: &OutboxRefs<'_>,
    ) -> Result<bool, StoreError> {
        let id = rec.request.id.as_str();
        let holds = Holds {
            timer: has_timer(self, id)?,
            outbox: outbox.contains(id),
            review: self.tree(TreeId::Review).contains_key(id)?,
        };
        // The cheap checks first: most records are kept or pruned on them.
        if !request_prunable(&rec.request, cutoff, LeaseFate::NoLease, holds) {
            return Ok(false);
        }
        Ok(request_prunable(
            &rec.request,
            cutoff,
            self.request_lease_fate(rec)?,
            holds,
        ))
    }

    fn lease_is_prunable(
        &self,
        rec: &LeaseRecord,
        cutoff: Instant,
        outbox: &OutboxRefs<'_>,
    ) -> Result<bool, StoreError> {
        let id = rec.lease.id.as_str();
        let holds = Holds {
            timer: has_timer(self, id)?,
            outbox: outbox.contains(id),
            // A break-glass grant's lease stays while its review is open.
            review: self
                .tree(TreeId::Review)
                .contains_key(rec.lease.request.as_str())?,
        };
        Ok(lease_prunable(&rec.lease, cutoff, holds))
    }

    async fn prune_requests(
        &self,
        cutoff: Instant,
        batch: usize,
        outbox: (&BTreeSet<String>, u64),
    ) -> Result<u64, StoreError> {
        let decode_request = |k: &[u8], v: &[u8]| {
            RequestRecord::try_from(decode::<StoredRequest>(k, v)?).map_err(|error| StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                error,
            })
        };
        self.prune_tree(
            &self.tree(TreeId::Requests),
            "request",
            batch,
            outbox,
            decode_request,
            |rec, outbox| self.request_is_prunable(rec, cutoff, outbox),
        )
        .await
    }

    async fn prune_leases(
        &self,
        cutoff: Instant,
        batch: usize,
        outbox: (&BTreeSet<String>, u64),
    ) -> Result<u64, StoreError> {
        let decode_lease = |k: &[u8], v: &[u8]| {
            LeaseRecord::try_from(decode::<StoredLease>(k, v)?).map_err(|error| StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                error,
            })
        };
        self.prune_tree(
            &self.tree(TreeId::Leases),
            "lease",
            batch,
            outbox,
            decode_lease,
            |rec, outbox| self.lease_is_prunable(rec, cutoff, outbox),
        )
        .await
    }

    /// One pass over `tree`: candidates are picked without the writer lock,
    /// then each batch is read again and re-checked under it
    /// (`remove_checked`), flushed, and the task yields before the next.
    /// `(scanned, mark)`: the ids the outbox named when the pass began (read
    /// once per pass, off the runtime) and the entry id that scan stopped at.
    async fn prune_tree<R>(
        &self,
        tree: &sled::Tree,
        kind: &'static str,
        batch: usize,
        (scanned, mark): (&BTreeSet<String>, u64),
        decode_record: impl Fn(&[u8], &[u8]) -> Result<R, StoreError>,
        prunable: impl Fn(&R, &OutboxRefs<'_>) -> Result<bool, StoreError>,
    ) -> Result<u64, StoreError> {
        let outbox = OutboxRefs {
            scanned,
            fresh: BTreeSet::new(),
        };
        let mut total = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (ids, next) = self.scan(tree, after.take(), batch, |k, v| {
                prunable(&decode_record(k, v)?, &outbox)
            })?;
            if !ids.is_empty() {
                let n =
                    self.remove_checked(tree, &ids, (scanned, mark), |id, outbox| match tree.get(id)? {
                        Some(v) => prunable(&decode_record(id.as_bytes(), &v)?, outbox),
                        None => Ok(false),
                    })?;
                crate::metrics::store_pruned(kind, n);
                total += n;
                // Not flushed here: a removal lost in a crash is only made
                // again by the next pass, and a sync of its own per batch
                // would make every concurrent commit (a revocation's) wait
                // for one more disk sync. The next commit's flush covers it.
            }
            tokio::task::yield_now().await;
            match next {
                Some(k) => after = Some(k),
                None => return Ok(total),
            }
        }
    }

    /// Up to `batch` keys of `tree` after `after` that `pick` chooses, read
    /// without the writer lock, and the key to continue after (`None` at
    /// the end). Looks at no more than four batches' worth of keys per call.
    #[allow(clippy::type_complexity)]
    fn scan(
        &self,
        tree: &sled::Tree,
        after: Option<Vec<u8>>,
        batch: usize,
        mut pick: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(Vec<String>, Option<Vec<u8>>), StoreError> {
        let iter = match &after {
            Some(k) => tree.range::<&[u8], _>((
                std::ops::Bound::Excluded(k.as_slice()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        let mut picked = Vec::new();
        let mut last = None;
        for (looked, item) in iter.enumerate() {
            let (k, v) = item?;
            if looked >= batch * 4 || picked.len() >= batch {
                return Ok((picked, last));
            }
            if pick(&k, &v)? {
                picked.push(String::from_utf8_lossy(&k).into_owned());
            }
            last = Some(k.to_vec());
        }
        Ok((picked, None))
    }

    /// Removes the keys of `tree` that `still` (checked again under the
    /// writer lock, where nothing else changes the store) says may go, in
    /// one atomic batch. The outbox's references are those `scanned` once
    /// per pass (entries below `mark`) and, read under the lock, those of
    /// the few entries added since: the whole outbox is never read under
    /// the lock. Returns how many went.
    fn remove_checked(
        &self,
        tree: &sled::Tree,
        ids: &[String],
        (scanned, mark): (&BTreeSet<String>, u64),
        still: impl Fn(&str, &OutboxRefs<'_>) -> Result<bool, StoreError>,
    ) -> Result<u64, StoreError> {
        // Any generation's tree (a mirror that reloaded has `leases@1`).
        let id = super::kv::TreeId::parse_stored_name(&tree.name())
            .map(|(id, _)| id)
            .ok_or_else(|| {
                StoreError::Io("retention pruned a tree the store does not know; report this bug".into())
            })?;
        let writer = self.writer()?;
        let outbox = OutboxRefs {
            scanned,
            fresh: outbox_references(self, mark)?,
        };
        let mut gone = Vec::new();
        for id in ids {
            if still(id, &outbox)? {
                gone.push(id);
            }
        }
        if !gone.is_empty() {
            writer.transact([id], |[tree]| {
                for id in &gone {
                    tree.remove(id.as_bytes())?;
                }
                Ok(())
            })?;
        }
        Ok(gone.len() as u64)
    }

    /// Moves audit records older than `cutoff` to the archive, a file at a
    /// time; the store's last record always stays (it carries the time a
    /// restarted clock must not start before, and the chain's link).
    async fn archive_audit(&self, cutoff: Instant, s: &RetentionSettings) -> Result<u64, StoreError> {
        let mut total = self.reconcile_archive(s).await?;
        loop {
            let chunk = s.archive_chunk;
            // Up to a whole file's records, decoded: off the runtime.
            let (records, oldest) = self
                .off_runtime(move |store| store.archivable(cutoff, chunk))
                .await?;
            let Some(oldest) = oldest else {
                return Ok(total);
            };
            if records.len() < s.archive_chunk && oldest >= s.archive_after.before(cutoff) {
                return Ok(total);
            }
            let base = self.audit_base()?;
            if records.first().map(|(seq, _)| *seq) != Some(base.seq + 1) {
                return Err(StoreError::Invariant(format!(
                    "the store's audit records do not start after record {} where the archive ends; run `jitbot audit verify`",
                    base.seq
                )));
            }
            let dir = s.archive_dir.clone();
            let records = self
                .off_runtime(move |_| archive::write_file(&dir, &records).map(|_| records))
                .await?;
            total += self.remove_archived(&records, s.batch).await?;
        }
    }

    /// Up to `chunk` records from the first, older than `cutoff`, never the
    /// last one; and the time of the oldest.
    #[allow(clippy::type_complexity)]
    fn archivable(
        &self,
        cutoff: Instant,
        chunk: usize,
    ) -> Result<(Vec<(u64, Vec<u8>)>, Option<Instant>), StoreError> {
        let last = match self.tree(TreeId::Audit).last()? {
            Some((k, _)) => k,
            None => return Ok((Vec::new(), None)),
        };
        let mut out = Vec::new();
        let mut oldest = None;
        for item in self.tree(TreeId::Audit).range(..last).take(chunk) {
            let (k, v) = item?;
            let stored: StoredAudit = decode(&k, &v)?;
            let entry = stored.into_entry();
            if entry.at >= cutoff {
                break;
            }
            oldest.get_or_insert(entry.at);
            out.push((entry.seq, v.to_vec()));
        }
        Ok((out, oldest))
    }

    /// Removes archived `records` from the store in batches, each checked
    /// (the store must hold the very bytes archived) and committed with the
    /// new `audit_base` under the writer lock, flushed, then a yield.
    async fn remove_archived(&self, records: &[(u64, Vec<u8>)], batch: usize) -> Result<u64, StoreError> {
        let mut total = 0;
        for part in records.chunks(batch.max(1)) {
            self.remove_archived_now(part)?;
            crate::metrics::audit_archived(part.len() as u64);
            total += part.len() as u64;
            self.flush_committed().await?;
            tokio::task::yield_now().await;
        }
        Ok(total)
    }

    fn remove_archived_now(&self, part: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let Some((last, _)) = part.last() else {
            return Ok(());
        };
        let trees = [super::kv::TreeId::Audit, super::kv::TreeId::Meta];
        self.writer()?.transact(trees, |[audit, meta]| {
            for (seq, bytes) in part {
                match audit.get(seq.to_be_bytes())? {
                    Some(held) if held.as_ref() == bytes.as_slice() => {
                        audit.remove(seq.to_be_bytes())?;
                    }
                    _ => {
                        return Err(abort(StoreError::Invariant(format!(
                            "audit record {seq} in the store is not the record archived; nothing was removed. Run `jitbot audit verify --archive`"
                        ))))
                    }
                }
            }
            let next = audit.get((last + 1).to_be_bytes())?.ok_or_else(|| {
                abort(StoreError::Invariant(format!(
                    "audit record {} is missing, so the last archived record cannot be linked; nothing was removed",
                    last + 1
                )))
            })?;
            let next: StoredAudit = decode(&(last + 1).to_be_bytes(), &next).map_err(abort)?;
            meta.insert(AUDIT_BASE, format!("{last}:{}", next.into_entry().prev).as_bytes())?;
            Ok(())
        })
    }

    /// Test hook: the first step of archiving alone, as if jitbot stopped
    /// right after writing an archive file and before removing its records
    /// from the store. Returns the file written, if any.
    #[doc(hidden)]
    pub fn archive_then_stop(
        &self,
        now: Instant,
        s: &RetentionSettings,
    ) -> Result<Option<archive::ArchiveFile>, StoreError> {
        let (records, _) = self.archivable(s.retain.before(now), s.archive_chunk)?;
        if records.is_empty() {
            return Ok(None);
        }
        archive::write_file(&s.archive_dir, &records).map(Some)
    }

    /// Finishes a move a crash interrupted (or catches a restored backup up
    /// with the archive): records of every archive file past the store's
    /// base that the store still holds (the same bytes) are removed from
    /// the store. Refuses to go on when the archive and the store disagree.
    pub async fn reconcile_archive(&self, s: &RetentionSettings) -> Result<u64, StoreError> {
        archive::remove_leftovers(&s.archive_dir)?;
        let files = archive::list(&s.archive_dir)?;
        let base = self.audit_base()?;
        let archived_to = archive::highest_archived(&files);
        if archived_to < base.seq {
            return Err(StoreError::Invariant(format!(
                "the audit archive in {} ends at record {archived_to} but the store's records start after record {}: \
                 archive files are missing. Put them back (or set store.archive_dir to where they are); \
                 nothing is archived until then",
                s.archive_dir.display(),
                base.seq
            )));
        }
        // Every file past the base: a backup from before a pass may be
        // restored next to files the pass wrote later.
        // Not a binary search: with a late copy in the archive, the files'
        // last records do not ascend.
        let from = files
            .iter()
            .position(|f| f.last > base.seq)
            .unwrap_or(files.len());
        let tail = &files[from..];
        if tail.is_empty() {
            return Ok(0);
        }
        let mut leftover = Vec::new();
        for rec in archive::Reader::new(tail) {
            let rec = rec?;
            if rec.seq > base.seq {
                let expected = base.seq + 1 + leftover.len() as u64;
                if rec.seq != expected {
                    return Err(StoreError::Invariant(format!(
                        "the audit archive in {} holds record {} where record {expected} should come next \
                         (in {}): archive files are missing or overlap. Put the files back and check them with \
                         `jitbot audit verify --archive`; nothing is archived until then",
                        s.archive_dir.display(),
                        rec.seq,
                        tail[rec.file].name()
                    )));
                }
                leftover.push((rec.seq, rec.bytes));
            }
        }
        tracing::info!(
            files = tail.len(),
            records = leftover.len(),
            "finishing an audit archive move a restart interrupted"
        );
        self.remove_archived(&leftover, s.batch).await
    }
}

/// Runs retention passes every `settings.every` (the first at once) until
/// shutdown. A failed pass is logged and tried again at the next one; it
/// never stops jitbot.
pub async fn run(
    store: Store,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    settings: RetentionSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            done = store.prune(clock.now(), &settings) => match done {
                Ok(p) if p != Pruned::default() => tracing::info!(
                    leases = p.leases,
                    requests = p.requests,
                    audit_archived = p.audit,
                    retain = %settings.retain,
                    "retention: pruned old records"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention pass failed; it runs again at the next interval"),
            },
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as D, TimeZone, Utc};
    use jitbot_core::request::BreakGlass;
    use jitbot_core::{GroupName, RequestId, UserId};

    fn t0() -> Instant {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn request(state: RequestState, decided: Option<Instant>) -> AccessRequest {
        AccessRequest {
            id: RequestId::new("r-1"),
            kind: RequestKind::Grant,
            group: GroupName::new("db-admins"),
            requester: UserId::new("alice"),
            duration: Span::from_hours(1),
            reason: "x".into(),
            created_at: t0(),
            decide_by: t0() + D::hours(1),
            state,
            approvals: Vec::new(),
            denials: Vec::new(),
            cancelled_by: None,
            auto_approved: false,
            break_glass: None,
            decided_at: decided,
        }
    }

    fn lease(state: LeaseState, ended: Option<Instant>) -> Lease {
        Lease {
            id: LeaseId::new("l-2"),
            request: RequestId::new("r-1"),
            group: GroupName::new("db-admins"),
            user: UserId::new("alice"),
            starts_at: t0(),
            expires_at: t0() + D::hours(1),
            latest_end: t0() + D::hours(8),
            state,
            preexisting: Some(false),
            membership: None,
            end_reason: None,
            ended_at: ended,
            revoke_attempts: 0,
            last_error: None,
            alerted: false,
            warned: false,
            late_add_found_at: None,
        }
    }

    #[test]
    fn only_ended_leases_older_than_the_cutoff_and_held_by_nothing_are_pruned() {
        let cutoff = t0() + D::days(10);
        let old = Some(t0() + D::hours(2));
        let free = Holds::default();
        assert!(lease_prunable(&lease(LeaseState::Ended, old), cutoff, free));
        // Ended recently: kept.
        assert!(!lease_prunable(
            &lease(LeaseState::Ended, Some(cutoff + D::seconds(1))),
            cutoff,
            free
        ));
        assert!(!lease_prunable(
            &lease(LeaseState::Ended, Some(cutoff)),
            cutoff,
            free
        ));
        // Never anything that has not ended, however old.
        for state in [LeaseState::Granting, LeaseState::Active, LeaseState::Revoking] {
            assert!(!lease_prunable(&lease(state, old), cutoff, free), "{state:?}");
        }
        // Held by a timer, a notice still to send, an open review.
        for holds in [
            Holds { timer: true, ..free },
            Holds { outbox: true, ..free },
            Holds { review: true, ..free },
        ] {
            assert!(
                !lease_prunable(&lease(LeaseState::Ended, old), cutoff, holds),
                "{holds:?}"
            );
        }
        // A lease from before `ended_at` was kept: its latest possible end counts.
        assert!(lease_prunable(&lease(LeaseState::Ended, None), cutoff, free));
        assert!(!lease_prunable(
            &lease(LeaseState::Ended, None),
            t0() + D::hours(8),
            free
        ));
    }

    #[test]
    fn only_finished_requests_whose_lease_ended_are_pruned() {
        let cutoff = t0() + D::days(10);
        let old = Some(t0() + D::minutes(5));
        let free = Holds::default();
        for state in [
            RequestState::Approved,
            RequestState::Denied,
            RequestState::Cancelled,
            RequestState::TimedOut,
        ] {
            assert!(
                request_prunable(&request(state, old), cutoff, LeaseFate::NoLease, free),
                "{state:?}"
            );
        }
        assert!(request_prunable(
            &request(RequestState::Approved, old),
            cutoff,
            LeaseFate::Ended,
            free
        ));
        assert!(request_prunable(
            &request(RequestState::Approved, old),
            cutoff,
            LeaseFate::Gone,
            free
        ));
        // Its lease still live: kept, however old the decision.
        assert!(!request_prunable(
            &request(RequestState::Approved, old),
            cutoff,
            LeaseFate::Live,
            free
        ));
        // Pending: never (even one whose window is long past).
        assert!(!request_prunable(
            &request(RequestState::Pending, None),
            cutoff,
            LeaseFate::NoLease,
            free
        ));
        // Decided recently.
        let recent = Some(cutoff + D::hours(1));
        assert!(!request_prunable(
            &request(RequestState::Denied, recent),
            cutoff,
            LeaseFate::NoLease,
            free
        ));
        // Awaiting break-glass review.
        let mut bg = request(RequestState::Approved, old);
        bg.break_glass = Some(BreakGlass {
            reason: "outage".into(),
            acknowledged: None,
        });
        assert!(!request_prunable(&bg, cutoff, LeaseFate::Ended, free));
        // Held by its review entry, a timer, a notice.
        for holds in [
            Holds { review: true, ..free },
            Holds { timer: true, ..free },
            Holds { outbox: true, ..free },
        ] {
            assert!(
                !request_prunable(
                    &request(RequestState::Denied, old),
                    cutoff,
                    LeaseFate::NoLease,
                    holds
                ),
                "{holds:?}"
            );
        }
        // No decision time recorded: its decision deadline counts.
        assert!(request_prunable(
            &request(RequestState::TimedOut, None),
            cutoff,
            LeaseFate::NoLease,
            free
        ));
    }
}
