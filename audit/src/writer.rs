//! The single writer: group commit, hash chain, size-based rotation, crash recovery.
//!
//! One OS thread owns the file. Each `Check` hands it an event and waits; the thread takes
//! everything queued, chains it, writes it with one `write` and, in `write` mode, only then
//! releases the callers. In `fsync` mode a second thread, `arbiter-audit-commit`, releases
//! them after one `fdatasync` that began after their write ([`Committer`]); while it syncs,
//! the writer goes on encoding and writing the next batch, which the next sync covers
//! (pipelined group commit). A failed write (or sync) releases its callers with an error
//! and rolls the file back to the last complete (synced) record; while the log is not
//! writable the thread probes it and reports when writing works again.
//!
//! The hand-off is batched on the async side too: events appended while the runtime still
//! has other tasks to run collect in a pending list, and one task passes the whole list to
//! the thread once the runtime has run out of ready work (see [`AuditLog::append`]). On one
//! core that is one wake-up of the writer per round of decisions instead of one per
//! decision; nothing is answered before its record is written, as before.
//!
//! Nothing on the path of a decision waits for a sync it does not need. A file rotated out
//! is synced (and, in `write` mode, its rename made durable) by a second thread,
//! `arbiter-audit-sync`, while the writer goes on in the new file: in `fsync` mode every
//! record of the old file was already synced before it was acknowledged, and in `write` mode
//! they were only ever promised to the operating system. The same thread keeps `write`
//! mode's dirty backlog small: every [`WRITE_BACK_BYTES`] written, it syncs the active file
//! through a file description of its own, so the kernel never holds minutes of the log in
//! memory for one large write-out (at rotation, on `sync`, or when its dirty limits are
//! reached) and a power loss takes at most about that much. Its jobs run in order, so the
//! old file is synced before anything of the new one is.
//!
//! One writer per log: [`AuditLog::open`] takes an exclusive advisory lock (`flock`) on
//! `.<name>.lock` beside the log before reading anything, and holds it until the writer
//! thread has finished, so a second server on the same log refuses to start instead of
//! forking the chain. The lock is on a file of its own, not on the log: the log is renamed
//! at every rotation, and a lock on its inode would leave the new active file unlocked. It is
//! a hidden file so that `arbiter audit verify audit.jsonl*` does not pick it up.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::checkpoint::{self, CheckpointFile, CheckpointReason};
use super::metrics::AuditMetrics;
use super::record::{self, AuditEvent, RecordError, GENESIS_HASH};
use super::{AuditConfig, AuditSync};

/// The writer stops taking more hand-offs once a batch holds this many records.
const MAX_BATCH: usize = 4096;
/// How often an unwritable log is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes written (then truncated away) by a probe: about one record, so a probe does not
/// pass on a disk with room for a few bytes only.
const PROBE_BYTES: usize = 2048;
/// Digits of the first seq in a rotated file's name, so names sort in chain order.
const SEQ_DIGITS: usize = 20;
/// In `write` mode, the active file is synced in the background after this many bytes
/// (see the module doc): like RocksDB's `bytes_per_sync`.
pub const WRITE_BACK_BYTES: u64 = 1024 * 1024;

/// Why the audit log cannot be opened or a record was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The log (or its directory) cannot be opened or read at start.
    #[error("cannot open audit log `{path}`: {reason}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The last complete record of an existing log is not valid, so the chain cannot be
    /// continued from it.
    #[error("audit log `{path}` line {line} is not a valid record ({source}); the chain cannot be continued: keep the file for review and move it aside")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        source: RecordError,
    },
    /// Another process (or another [`AuditLog`] in this one) writes this log.
    #[error("audit log `{path}` is already written by {holder} (it holds the lock `{lock}`): two writers would fork the chain; stop the other server or give this one another --audit-log")]
    Locked {
        /// The log.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Who holds the lock, as far as it says: `process 1234` (the pid it wrote into the
        /// lock file, in its pid namespace) or `another process`.
        holder: String,
    },
    /// The log ends before the newest signed checkpoint: records it covers are gone.
    #[error("audit log `{path}` ends at seq {head} but `{checkpoints}` holds a signed checkpoint of seq {seq} ({ts}): records were removed or the log was restored from an older backup; refusing to continue the chain over the gap. Keep every file for review; to start a new chain, move the log, its rotated files and its checkpoints aside")]
    BehindCheckpoint {
        /// The log.
        path: PathBuf,
        /// The checkpoints file.
        checkpoints: PathBuf,
        /// Seq of the log's last record (0: none).
        head: u64,
        /// Seq of the newest checkpoint.
        seq: u64,
        /// When that checkpoint was signed.
        ts: String,
    },
    /// The log's record at the newest checkpoint's seq is not the one it signed.
    #[error("audit log `{path}` record seq {seq} does not have the hash `{signed}` its signed checkpoint in `{checkpoints}` names: the log was rewritten; refusing to continue the chain")]
    Rewritten {
        /// The log.
        path: PathBuf,
        /// The checkpoints file.
        checkpoints: PathBuf,
        /// Seq of the record.
        seq: u64,
        /// Hash the checkpoint signed.
        signed: String,
    },
    /// The record was not written.
    #[error("cannot write audit log `{path}`: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The event cannot be serialized.
    #[error("cannot encode audit record: {0}")]
    Encode(String),
    /// The writer thread is gone.
    #[error("the audit writer has stopped")]
    Stopped,
}

/// Where a written record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Its sequence number.
    pub seq: u64,
}

struct Job {
    event: AuditEvent,
    done: oneshot::Sender<Result<Written, AuditError>>,
}

/// Handle to the audit writer; clones share the one writer thread. Dropping the last handle
/// waits for the thread to write what is queued, sync and release the lock, so the log can
/// be reopened right after.
#[derive(Debug, Clone)]
pub struct AuditLog {
    thread: Arc<WriterThread>,
    writable: watch::Receiver<bool>,
    written: watch::Receiver<u64>,
    metrics: AuditMetrics,
    path: PathBuf,
}

impl AuditLog {
    /// Locks the log at `config.path` (see the module doc), opens or creates it, continues
    /// the chain of what is already there (rotated files included) and starts the writer
    /// thread.
    pub fn open(config: &AuditConfig, metrics: AuditMetrics) -> Result<Self, AuditError> {
        // Before anything is read or renamed: recovery moves torn files aside.
        let lock = lock(&config.path)?;
        let chain = recover(&config.path, &metrics)?;
        let last_seq = chain.next_seq - 1;
        // Records after the newest checkpoint (a crash, or checkpoints newly configured) are
        // covered by the next one.
        let signed = check_against_checkpoint(&config.path, last_seq, &chain.last_hash)?;
        let unsigned = last_seq - signed.min(last_seq);
        let syncer = Syncer::start(&config.path);
        let (writable_tx, writable) = watch::channel(true);
        let (written_tx, written) = watch::channel(last_seq);
        let writable_tx = Arc::new(writable_tx);
        let written_tx = Arc::new(written_tx);
        metrics.writable.set(1);
        let head = Head {
            len: chain.active_len,
            first_seq: chain.active_first_seq,
            next_seq: chain.next_seq,
            last_hash: chain.last_hash.clone(),
        };
        let committer = match config.sync {
            AuditSync::Fsync => Some(
                Committer::start(
                    &config.path,
                    head,
                    Arc::clone(&writable_tx),
                    Arc::clone(&written_tx),
                    metrics.clone(),
                )
                .map_err(|e| AuditError::Open {
                    path: config.path.clone(),
                    reason: format!("cannot start the commit thread: {e}"),
                })?,
            ),
            AuditSync::Write => None,
        };
        let mut writer = Writer {
            path: config.path.clone(),
            sync: config.sync,
            max_bytes: config.max_bytes,
            file: None,
            write_back: None,
            unsynced: 0,
            syncer,
            committer,
            len: chain.active_len,
            dirty: false,
            first_seq: chain.active_first_seq,
            next_seq: chain.next_seq,
            last_hash: chain.last_hash,
            writable: true,
            writable_tx,
            written_tx,
            metrics: metrics.clone(),
            buf: Vec::with_capacity(64 * 1024),
            checkpoints: config.checkpoints.as_ref().map(|c| {
                (
                    CheckpointFile::new(&config.path, c.key.clone()),
                    c.every.max(1),
                    c.interval,
                )
            }),
            unsigned_since: (unsigned > 0).then(Instant::now),
            unsigned,
            _lock: lock,
        };
        // Fail at start, not on the first request, when the file cannot be opened at all
        // (missing directory, permissions).
        writer.open().map_err(|e| AuditError::Open {
            path: config.path.clone(),
            reason: e.to_string(),
        })?;
        tracing::info!(
            path = %config.path.display(),
            sync = ?config.sync,
            next_seq = writer.next_seq,
            "audit log open"
        );
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("arbiter-audit".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| AuditError::Open {
                path: config.path.clone(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            thread: Arc::new(WriterThread {
                tx: Some(tx),
                handle: Some(handle),
                pending: Mutex::new(Vec::new()),
                metrics: metrics.clone(),
            }),
            writable,
            written,
            metrics,
            path: config.path.clone(),
        })
    }

    /// Writes `event` as the next record; returns once it is written (and fsynced in
    /// `fsync` mode). If the caller stops waiting the record is still written.
    ///
    /// Inside a tokio runtime the event first joins a pending list; the append that finds
    /// the list empty spawns one task that yields until the runtime has no other ready task
    /// and then hands the whole list to the writer thread. The other decisions of the same
    /// round join the list meanwhile, so they share one hand-off (and one group commit).
    /// The pending list is owned by the log, not by the caller: a caller that stops waiting
    /// does not take its record (or anyone else's) with it.
    pub async fn append(&self, event: AuditEvent) -> Result<Written, AuditError> {
        let (done, result) = oneshot::channel();
        self.metrics.queue_depth.inc();
        let job = Job { event, done };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                if self.thread.pend(job) {
                    let thread = Arc::clone(&self.thread);
                    runtime.spawn(async move {
                        // Deferred until the scheduler has run every task that is ready (and
                        // polled I/O once): the rest of this round's decisions.
                        tokio::task::yield_now().await;
                        thread.hand_off();
                    });
                }
            }
            // No runtime to defer to: hand it over at once.
            Err(_) => {
                if !self.thread.send(vec![job]) {
                    return Err(AuditError::Stopped);
                }
            }
        }
        result.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// `true` while records can be written; changes when a write fails or a probe succeeds.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.clone()
    }

    /// The seq of the last record written.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }

    /// The metrics this log updates.
    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    /// The active file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The writer thread, the only sender of its queue, and the events waiting to be handed to it.
struct WriterThread {
    tx: Option<mpsc::Sender<Vec<Job>>>,
    handle: Option<JoinHandle<()>>,
    /// Appended, not yet handed to the thread (see [`AuditLog::append`]).
    pending: Mutex<Vec<Job>>,
    metrics: AuditMetrics,
}

impl std::fmt::Debug for WriterThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("WriterThread")
            .field("running", &self.tx.is_some())
            .field("pending", &pending)
            .finish_non_exhaustive()
    }
}

impl WriterThread {
    /// Adds `job` to the pending list; `true` if the list was empty, so the caller must see
    /// to its hand-off.
    fn pend(&self, job: Job) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.push(job);
        pending.len() == 1
    }

    /// Hands every pending job to the thread.
    fn hand_off(&self) {
        let jobs =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if !jobs.is_empty() {
            self.send(jobs);
        }
    }

    /// Sends `jobs` to the thread; if it is gone, answers them `Stopped`. `false` then.
    fn send(&self, jobs: Vec<Job>) -> bool {
        let jobs = match &self.tx {
            Some(tx) => match tx.send(jobs) {
                Ok(()) => return true,
                Err(mpsc::SendError(jobs)) => jobs,
            },
            None => jobs,
        };
        self.metrics
            .queue_depth
            .dec_by(i64::try_from(jobs.len()).unwrap_or(i64::MAX));
        for job in jobs {
            let _ = job.done.send(Err(AuditError::Stopped));
        }
        false
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        // What is still pending goes to the thread first: a record appended is written even
        // if every caller stopped waiting.
        self.hand_off();
        // Closing the queue ends the thread once it has written what was queued; waiting
        // for it makes "the last handle is gone" mean "the file is synced and unlocked".
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

struct Writer {
    path: PathBuf,
    sync: AuditSync,
    max_bytes: u64,
    /// The active file (shared with the commit thread in `fsync` mode).
    file: Option<Arc<File>>,
    /// `write` mode: a second file description of the active file, synced by the sync
    /// thread (its own description, so a write-back error it sees is still reported to the
    /// writer's own syncs, e.g. before a checkpoint).
    write_back: Option<Arc<File>>,
    /// `write` mode: bytes written to the active file since its last background sync.
    unsynced: u64,
    /// The background sync thread (`None`: it could not start; the writer syncs inline).
    syncer: Option<Syncer>,
    /// `fsync` mode: the commit thread, which syncs what the writer wrote and answers it.
    committer: Option<Committer>,
    /// Length of the complete records in the active file.
    len: u64,
    /// Bytes past `len` may exist (a write failed half-way).
    dirty: bool,
    first_seq: Option<u64>,
    next_seq: u64,
    last_hash: String,
    writable: bool,
    writable_tx: Arc<watch::Sender<bool>>,
    written_tx: Arc<watch::Sender<u64>>,
    metrics: AuditMetrics,
    buf: Vec<u8>,
    /// Where checkpoints go, and after how many records or how long.
    checkpoints: Option<(CheckpointFile, u64, Duration)>,
    /// When the oldest record not covered by a checkpoint was written.
    unsigned_since: Option<Instant>,
    /// Records not covered by a checkpoint.
    unsigned: u64,
    /// Held (never read) for the life of the thread: the log's exclusive lock.
    _lock: File,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Vec<Job>>) {
        let mut batch = Vec::new();
        loop {
            // A sync that failed on the commit thread is taken back here (in `fsync` mode
            // the writer wakes every probe interval to see to it without a new batch).
            self.settle();
            let first = match (self.writable, self.checkpoint_due_in()) {
                (false, _) => rx.recv_timeout(PROBE_INTERVAL),
                (true, Some(due)) => rx.recv_timeout(due.min(PROBE_INTERVAL)),
                (true, None) if self.committer.is_some() => rx.recv_timeout(PROBE_INTERVAL),
                (true, None) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match first {
                Ok(jobs) => {
                    batch.extend(jobs);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(jobs) => batch.extend(jobs),
                            Err(_) => break,
                        }
                    }
                    self.metrics
                        .queue_depth
                        .dec_by(i64::try_from(batch.len()).unwrap_or(i64::MAX));
                    self.commit(&mut batch);
                }
                Err(RecvTimeoutError::Timeout) if !self.writable => self.probe(),
                Err(RecvTimeoutError::Timeout) => {
                    if self.checkpoint_due_in().is_some_and(|due| due.is_zero()) {
                        self.checkpoint(CheckpointReason::Periodic);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Everything written is synced (and answered) before the last checkpoint.
        self.drain();
        self.checkpoint(CheckpointReason::Shutdown);
        if let Some(file) = &self.file {
            if let Err(e) = file.sync_all() {
                tracing::warn!(path = %self.path.display(), "audit log sync at shutdown failed: {e}");
            }
        }
        if let Some(committer) = self.committer.take() {
            committer.finish();
        }
        // Files rotated out are synced before the lock is released.
        if let Some(syncer) = self.syncer.take() {
            syncer.finish();
        }
    }

    fn commit(&mut self, batch: &mut Vec<Job>) {
        let started = Instant::now();
        if let Err(e) = self.prepare() {
            let error = self.write_error(&e);
            for job in batch.drain(..) {
                let _ = job.done.send(Err(error.clone()));
            }
            return;
        }
        self.buf.clear();
        let mut seq = self.next_seq;
        let mut prev = self.last_hash.clone();
        let mut accepted = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            let mark = self.buf.len();
            match record::encode(&job.event, seq, &prev, &mut self.buf) {
                Ok(hash) => {
                    accepted.push((job.done, seq));
                    prev = hash;
                    seq += 1;
                }
                Err(e) => {
                    self.buf.truncate(mark);
                    let _ = job.done.send(Err(AuditError::Encode(e.to_string())));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        match self.write_buf() {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.first_seq.get_or_insert(self.next_seq);
                self.next_seq = seq;
                self.last_hash = prev;
                let count = accepted.len() as u64;
                if let Some(committer) = &self.committer {
                    // `fsync` mode: answered by the commit thread once a sync that began
                    // after this write has succeeded; meanwhile this thread goes on with the
                    // next batch (see the module doc).
                    let head = self.head();
                    if let Err(accepted) = committer.hand_over(accepted, head, started) {
                        // A sync failed after these records' predecessors: they chain from
                        // records being taken back, so they are refused with them.
                        let error = committer.failure();
                        for (done, _) in accepted {
                            let _ = done.send(Err(error.clone()));
                        }
                        self.settle();
                        return;
                    }
                    self.set_writable(true, None);
                } else {
                    self.set_writable(true, None);
                    self.metrics.records_written.inc_by(count);
                    self.metrics.batch_records.observe(count as f64);
                    self.metrics
                        .write_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.written_tx.send_replace(seq - 1);
                    for (done, seq) in accepted {
                        let _ = done.send(Ok(Written { seq }));
                    }
                }
                self.write_back(self.buf.len() as u64);
                self.unsigned += count;
                self.unsigned_since.get_or_insert_with(Instant::now);
                if self
                    .checkpoints
                    .as_ref()
                    .is_some_and(|(_, every, _)| self.unsigned >= *every)
                {
                    self.checkpoint(CheckpointReason::Periodic);
                }
            }
            Err(e) => {
                self.dirty = true;
                let error = self.write_error(&e);
                for (done, _) in accepted {
                    let _ = done.send(Err(error.clone()));
                }
                // Take the half-written bytes back now if we can; `prepare` retries.
                self.truncate_dirty();
            }
        }
    }

    /// Where the chain stands after the last record written.
    fn head(&self) -> Head {
        Head {
            len: self.len,
            first_seq: self.first_seq,
            next_seq: self.next_seq,
            last_hash: self.last_hash.clone(),
        }
    }

    /// `fsync` mode: if a sync failed on the commit thread, takes back every record not
    /// synced (the commit thread has refused them): the file is cut back to the last synced
    /// record and the chain goes on from there. Nothing is waiting for a sync then.
    fn settle(&mut self) {
        let Some(durable) = self.committer.as_ref().and_then(Committer::take_failure) else {
            return;
        };
        // The commit thread has said so already (watch, metric, log); this thread probes.
        if self.writable {
            self.writable = false;
            self.metrics.writable.set(0);
            self.writable_tx.send_replace(false);
        }
        self.len = durable.len;
        self.first_seq = durable.first_seq;
        self.next_seq = durable.next_seq;
        self.last_hash = durable.last_hash;
        self.dirty = true;
        self.truncate_dirty();
    }

    /// `fsync` mode: waits until everything written is synced and answered, or refused and
    /// taken back.
    fn drain(&mut self) {
        if let Some(committer) = &self.committer {
            committer.wait_idle();
        }
        self.settle();
    }

    fn write_error(&mut self, e: &io::Error) -> AuditError {
        self.metrics.write_errors.inc();
        self.set_writable(false, Some(e));
        AuditError::Write {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn write_buf(&mut self) -> io::Result<()> {
        let mut file: &File = self
            .file
            .as_deref()
            .ok_or_else(|| io::Error::other("no file"))?;
        file.write_all(&self.buf)?;
        if self.committer.is_some() {
            // `fsync` mode: the commit thread syncs, then checks that the file still has a
            // name, before anything is answered.
            return Ok(());
        }
        // Removed while these records were written: they are in no file, so they are not
        // acknowledged (`prepare` starts a new file for the next batch).
        if deleted(file) {
            return Err(io::Error::other(
                "the audit log was deleted while records were written to it",
            ));
        }
        Ok(())
    }

    /// Makes the active file ready to append: open, free of half-written bytes, rotated if
    /// it is full.
    fn prepare(&mut self) -> io::Result<()> {
        self.settle();
        let deleted_now = self.file.as_deref().is_some_and(deleted);
        if deleted_now || self.file.is_none() || self.len >= self.max_bytes || self.dirty {
            // The file is replaced or cut back: nothing of it may still be on its way to
            // the disk (`fsync` mode); a failed sync is taken back first.
            self.drain();
        }
        if self.file.as_deref().is_some_and(deleted) {
            // Someone removed the active file: what it held is gone, and records appended
            // to it now would be too (answered, yet in no file anyone can read). Start a new
            // file at the path; the chain goes on from the last record, so a verifier shows
            // the gap where the removed records were.
            tracing::error!(
                path = %self.path.display(),
                next_seq = self.next_seq,
                "the audit log was deleted while open; its records went with it; continuing the chain in a new file"
            );
            self.file = None;
            self.len = 0;
            self.first_seq = None;
            self.dirty = false;
        }
        if self.file.is_none() {
            self.open()?;
        }
        if self.dirty {
            self.truncate_dirty();
            if self.dirty {
                return Err(io::Error::other(
                    "cannot remove a half-written record from the end of the file",
                ));
            }
        }
        if self.len >= self.max_bytes && self.first_seq.is_some() {
            if let Err(e) = self.rotate() {
                // Better one oversized file than refused decisions.
                tracing::error!(path = %self.path.display(), "cannot rotate the audit log, appending to it: {e}");
            }
            if self.file.is_none() {
                self.open()?;
            }
        }
        Ok(())
    }

    fn truncate_dirty(&mut self) {
        if let Some(file) = &self.file {
            // Only bytes of a write that failed, never acknowledged, are removed.
            if file.set_len(self.len).is_ok() {
                self.dirty = false;
            }
        }
    }

    fn open(&mut self) -> io::Result<()> {
        let existed = self.path.exists();
        let file = Arc::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        if !existed && self.sync == AuditSync::Fsync {
            sync_dir(&self.path)?;
        }
        if let Some(committer) = &self.committer {
            // Only ever with nothing waiting for a sync (see `prepare`).
            committer.switch(Arc::clone(&file), self.head());
        }
        self.file = Some(file);
        self.unsynced = 0;
        self.write_back = None;
        if self.sync == AuditSync::Write && self.syncer.is_some() {
            // Only a way to keep the backlog small: without it, the log works as before.
            match OpenOptions::new().append(true).open(&self.path) {
                Ok(file) => self.write_back = Some(Arc::new(file)),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "audit log: no background write-back ({e})")
                }
            }
        }
        Ok(())
    }

    /// `write` mode: `bytes` more were written; past [`WRITE_BACK_BYTES`], the sync thread
    /// syncs the active file (one such job waiting at a time). Never waits for it.
    fn write_back(&mut self, bytes: u64) {
        let (Some(file), Some(syncer)) = (&self.write_back, &self.syncer) else {
            return;
        };
        self.unsynced += bytes;
        if self.unsynced < WRITE_BACK_BYTES || syncer.write_back_queued.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.unsynced = 0;
        syncer.send(SyncJob::WriteBack(Arc::clone(file)));
    }

    fn rotate(&mut self) -> io::Result<()> {
        let Some(first) = self.first_seq else {
            return Ok(());
        };
        let target = rotated_name(&self.path, first);
        if target.exists() {
            return Err(io::Error::other(format!(
                "`{}` already exists",
                target.display()
            )));
        }
        // A checkpoint (when configured) covers the file's last record; it syncs the file
        // first, as every checkpoint does.
        self.checkpoint(CheckpointReason::Rotation);
        std::fs::rename(&self.path, &target)?;
        let old = self.file.take();
        self.write_back = None;
        self.len = 0;
        self.first_seq = None;
        self.metrics.rotations.inc();
        tracing::info!(
            path = %self.path.display(),
            rotated = %target.display(),
            next_seq = self.next_seq,
            "audit log rotated"
        );
        // The old file's sync is not this batch's business (see the module doc): in `fsync`
        // mode its records are synced already, in `write` mode they were never promised to
        // the disk. It goes to the sync thread, ahead of anything of the new file.
        if let Some(old) = old {
            let job = SyncJob::Retire {
                file: old,
                rotated: target,
                // `fsync` mode makes the rename durable below, before any record of the new
                // file is acknowledged.
                sync_dir: self.sync == AuditSync::Write,
            };
            match &self.syncer {
                Some(syncer) => syncer.send(job),
                None => job.run(),
            }
        }
        // Creates the new file; in `fsync` mode also syncs the directory (the rename and
        // the new name).
        self.open()
    }

    /// While the log is not writable: write about a record's worth of bytes past the end
    /// and take them back. A crash in between leaves a torn tail, handled at start.
    fn probe(&mut self) {
        let result = self.prepare().and_then(|()| {
            let mut file: &File = self
                .file
                .as_deref()
                .ok_or_else(|| io::Error::other("no file"))?;
            self.dirty = true;
            file.write_all(&[b' '; PROBE_BYTES])?;
            if self.sync == AuditSync::Fsync {
                file.sync_data()?;
            }
            file.set_len(self.len)?;
            self.dirty = false;
            Ok(())
        });
        match result {
            Ok(()) => self.set_writable(true, None),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), "audit log still not writable: {e}");
                self.truncate_dirty();
            }
        }
    }

    /// How long until the unsigned records are due for a checkpoint (`None`: nothing due).
    fn checkpoint_due_in(&self) -> Option<Duration> {
        let (_, _, interval) = self.checkpoints.as_ref()?;
        let since = self.unsigned_since?;
        Some(interval.saturating_sub(since.elapsed()))
    }

    /// Signs the head of the chain if records are unsigned. The log is synced first, so a
    /// checkpoint never covers a record a power loss could still take (`write` mode). A
    /// failure does not refuse decisions (the records are written); it is logged and
    /// counted, and verification reports the records after the last checkpoint as unsigned.
    fn checkpoint(&mut self, reason: CheckpointReason) {
        if self.unsigned == 0 || self.next_seq <= 1 || self.checkpoints.is_none() {
            return;
        }
        // `fsync` mode: the commit thread first syncs (or takes back) what it has.
        self.drain();
        if self.unsigned == 0 || self.next_seq <= 1 {
            return;
        }
        let Some((file, _, _)) = self.checkpoints.as_mut() else {
            return;
        };
        let synced = match &self.file {
            Some(log) => log.sync_data(),
            None => Ok(()),
        };
        let head = self.next_seq - 1;
        match synced.and_then(|()| file.append(head, &self.last_hash, reason)) {
            Ok(()) => {
                self.unsigned = 0;
                self.unsigned_since = None;
                self.metrics.checkpoints.inc();
            }
            Err(e) => {
                self.metrics.checkpoint_errors.inc();
                // Try again at the next batch or interval, not in a loop.
                self.unsigned_since = Some(Instant::now());
                tracing::error!(path = %file.path().display(), seq = head, "cannot write an audit checkpoint: {e}");
            }
        }
    }

    fn set_writable(&mut self, writable: bool, error: Option<&io::Error>) {
        if writable == self.writable {
            return;
        }
        self.writable = writable;
        self.metrics.writable.set(i64::from(writable));
        self.writable_tx.send_replace(writable);
        match error {
            Some(e) if !writable => tracing::error!(
                path = %self.path.display(),
                "audit log not writable, refusing decisions (UNAVAILABLE) until it is: {e}"
            ),
            _ => tracing::info!(path = %self.path.display(), "audit log writable again"),
        }
    }
}

/// Where the chain stands after a record: the active file's length and first seq, the next
/// seq and the last hash.
#[derive(Debug, Clone)]
struct Head {
    len: u64,
    first_seq: Option<u64>,
    next_seq: u64,
    last_hash: String,
}

/// A written record's caller and seq.
type Answer = (oneshot::Sender<Result<Written, AuditError>>, u64);

/// `fsync` mode's commit thread (`arbiter-audit-commit`) and what it shares with the writer.
///
/// The writer writes a batch and hands its callers over; the commit thread takes everything
/// handed over so far, syncs the file once (`fdatasync`), checks that the file still has a
/// name and answers them all. While it syncs, the writer encodes and writes the next
/// batches, which the next sync covers: on one core the decisions of the next round are
/// computed while the disk works, instead of after it (pipelined group commit). A sync
/// only vouches for what was written before it began, so a batch handed over during a sync
/// waits for the next one.
///
/// A failed sync refuses every record not yet synced, those written during the failed sync
/// too (their chain runs through the refused ones); the writer then cuts the file back to
/// the last synced record and continues the chain from there ([`Writer::settle`]). Until it
/// has, the commit thread takes nothing new.
struct Committer {
    shared: Arc<(Mutex<Commits>, Condvar)>,
    handle: JoinHandle<()>,
}

struct Commits {
    /// The active file (changed by the writer only when nothing waits for a sync).
    file: Option<Arc<File>>,
    /// Written, waiting for a sync that begins after their write.
    waiting: Vec<Answer>,
    /// When the oldest of `waiting` was handed to the writer (for `write_seconds`).
    waiting_since: Option<Instant>,
    /// The writer's head after the last of `waiting`.
    head: Head,
    /// The head the last successful sync covers.
    durable: Head,
    /// A sync is running.
    syncing: bool,
    /// A sync failed: the records after `durable` are refused and must be taken back.
    failed: Option<AuditError>,
    /// The writer has finished: sync what is waiting, then stop.
    closed: bool,
}

impl Committer {
    fn start(
        path: &Path,
        head: Head,
        writable_tx: Arc<watch::Sender<bool>>,
        written_tx: Arc<watch::Sender<u64>>,
        metrics: AuditMetrics,
    ) -> io::Result<Committer> {
        let shared = Arc::new((
            Mutex::new(Commits {
                file: None,
                waiting: Vec::new(),
                waiting_since: None,
                head: head.clone(),
                durable: head,
                syncing: false,
                failed: None,
                closed: false,
            }),
            Condvar::new(),
        ));
        let thread = Arc::clone(&shared);
        let path = path.to_owned();
        let handle = std::thread::Builder::new()
            .name("arbiter-audit-commit".into())
            .spawn(move || commit_loop(&thread, &path, &writable_tx, &written_tx, &metrics))?;
        Ok(Committer { shared, handle })
    }

    fn lock(&self) -> MutexGuard<'_, Commits> {
        self.shared.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands written records over for the next sync; gives them back if a failed sync has
    /// not been taken back yet.
    fn hand_over(
        &self,
        answers: Vec<Answer>,
        head: Head,
        written_at: Instant,
    ) -> Result<(), Vec<Answer>> {
        let mut commits = self.lock();
        if commits.failed.is_some() {
            return Err(answers);
        }
        commits.waiting.extend(answers);
        commits.waiting_since.get_or_insert(written_at);
        commits.head = head;
        drop(commits);
        self.shared.1.notify_all();
        Ok(())
    }

    /// The error of the failed sync not yet taken back.
    fn failure(&self) -> AuditError {
        self.lock().failed.clone().unwrap_or(AuditError::Stopped)
    }

    /// After a failed sync: clears it and returns the head to go back to.
    fn take_failure(&self) -> Option<Head> {
        let mut commits = self.lock();
        commits.failed.take()?;
        commits.head = commits.durable.clone();
        Some(commits.durable.clone())
    }

    /// Waits until nothing is waiting for a sync or being synced.
    fn wait_idle(&self) {
        let mut commits = self.lock();
        while commits.syncing || !commits.waiting.is_empty() {
            commits = self
                .shared
                .1
                .wait(commits)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A new active file holding what `head` says, all of it synced.
    fn switch(&self, file: Arc<File>, head: Head) {
        let mut commits = self.lock();
        commits.file = Some(file);
        commits.head = head.clone();
        commits.durable = head;
    }

    /// Syncs and answers what is waiting, then ends the thread.
    fn finish(self) {
        self.lock().closed = true;
        self.shared.1.notify_all();
        let _ = self.handle.join();
    }
}

/// The commit thread: see [`Committer`].
fn commit_loop(
    shared: &(Mutex<Commits>, Condvar),
    path: &Path,
    writable_tx: &watch::Sender<bool>,
    written_tx: &watch::Sender<u64>,
    metrics: &AuditMetrics,
) {
    let (lock, wake) = shared;
    let mut commits = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        while commits.waiting.is_empty() && !commits.closed {
            commits = wake.wait(commits).unwrap_or_else(PoisonError::into_inner);
        }
        if commits.waiting.is_empty() {
            return;
        }
        // Everything written so far; what is handed over from now on waits for the next sync.
        let answers = std::mem::take(&mut commits.waiting);
        let since = commits.waiting_since.take();
        let head = commits.head.clone();
        let file = commits.file.clone();
        commits.syncing = true;
        drop(commits);

        #[cfg(test)]
        let held = test_gate::before_commit(path);
        #[cfg(not(test))]
        let held = Ok(());
        let synced = match &file {
            Some(file) => held.and_then(|()| file.sync_data()).and_then(|()| {
                // Removed while these records were written: they are in no file, so they
                // are not acknowledged (the writer starts a new file).
                if deleted(file) {
                    Err(io::Error::other(
                        "the audit log was deleted while records were written to it",
                    ))
                } else {
                    Ok(())
                }
            }),
            None => Err(io::Error::other("no file")),
        };

        commits = lock.lock().unwrap_or_else(PoisonError::into_inner);
        commits.syncing = false;
        match synced {
            Ok(()) => {
                commits.durable = head.clone();
                drop(commits);
                let count = answers.len() as u64;
                metrics.records_written.inc_by(count);
                metrics.batch_records.observe(count as f64);
                if let Some(since) = since {
                    metrics.write_seconds.observe(since.elapsed().as_secs_f64());
                }
                written_tx.send_replace(head.next_seq - 1);
                for (done, seq) in answers {
                    let _ = done.send(Ok(Written { seq }));
                }
            }
            Err(e) => {
                // Refused: these, and whatever was written after them.
                let error = AuditError::Write {
                    path: path.to_owned(),
                    reason: e.to_string(),
                };
                commits.failed = Some(error.clone());
                let later = std::mem::take(&mut commits.waiting);
                commits.waiting_since = None;
                drop(commits);
                metrics.write_errors.inc();
                metrics.writable.set(0);
                writable_tx.send_replace(false);
                tracing::error!(
                    path = %path.display(),
                    "audit log not writable, refusing decisions (UNAVAILABLE) until it is: {e}"
                );
                for (done, _) in answers.into_iter().chain(later) {
                    let _ = done.send(Err(error.clone()));
                }
            }
        }
        wake.notify_all();
        commits = lock.lock().unwrap_or_else(PoisonError::into_inner);
    }
}

/// A job of the sync thread.
enum SyncJob {
    /// `write` mode: sync the active file (through the writer's second description).
    WriteBack(Arc<File>),
    /// Sync a file just rotated out, then close it.
    Retire {
        file: Arc<File>,
        /// Its name now.
        rotated: PathBuf,
        /// Also sync its directory (the rename), in `write` mode.
        sync_dir: bool,
    },
}

impl SyncJob {
    fn run(self) {
        match self {
            SyncJob::WriteBack(file) => {
                if let Err(e) = file.sync_data() {
                    // The writer's own description still sees the error at its next sync.
                    tracing::warn!("audit log background write-back failed: {e}");
                }
            }
            SyncJob::Retire {
                file,
                rotated,
                sync_dir: dir,
            } => {
                #[cfg(test)]
                test_gate::before_retire(&rotated);
                let started = Instant::now();
                let synced =
                    file.sync_all()
                        .and_then(|()| if dir { sync_dir(&rotated) } else { Ok(()) });
                drop(file);
                match synced {
                    Ok(()) => tracing::info!(
                        rotated = %rotated.display(),
                        sync_ms = started.elapsed().as_millis() as u64,
                        "rotated audit file synced"
                    ),
                    Err(e) => tracing::error!(
                        rotated = %rotated.display(),
                        "cannot sync the rotated audit file: {e}"
                    ),
                }
                #[cfg(test)]
                test_gate::after_retire(&rotated);
            }
        }
    }
}

/// The sync thread (`arbiter-audit-sync`) and its queue.
struct Syncer {
    tx: mpsc::Sender<SyncJob>,
    handle: JoinHandle<()>,
    /// A [`SyncJob::WriteBack`] is queued or running.
    write_back_queued: Arc<AtomicBool>,
}

impl Syncer {
    /// `None` if the thread cannot start: the writer then syncs rotated files itself.
    fn start(path: &Path) -> Option<Syncer> {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        let write_back_queued = Arc::new(AtomicBool::new(false));
        let queued = Arc::clone(&write_back_queued);
        let spawned = std::thread::Builder::new()
            .name("arbiter-audit-sync".into())
            .spawn(move || {
                for job in rx {
                    let write_back = matches!(job, SyncJob::WriteBack(_));
                    job.run();
                    if write_back {
                        queued.store(false, Ordering::Release);
                    }
                }
            });
        match spawned {
            Ok(handle) => Some(Syncer {
                tx,
                handle,
                write_back_queued,
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot start the audit sync thread, rotated files are synced inline: {e}");
                None
            }
        }
    }

    /// Queues `job`; runs it here if the thread is gone.
    fn send(&self, job: SyncJob) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            job.run();
        }
    }

    /// Runs what is queued and ends the thread.
    fn finish(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

/// Lets a test hold a rotated file's background sync, to show that decisions do not wait
/// for it.
#[cfg(test)]
mod test_gate {
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// Per log directory: released by the test; told when the sync is done.
    type Gate = (PathBuf, mpsc::Receiver<()>, mpsc::Sender<PathBuf>);

    static GATES: Mutex<Vec<Gate>> = Mutex::new(Vec::new());

    /// Holds the next rotated-file sync of a log in `dir` until `release` is sent (or
    /// dropped); `synced` gets the rotated file's path after its sync.
    pub(super) fn hold(dir: &Path) -> (mpsc::Sender<()>, mpsc::Receiver<PathBuf>) {
        let (release, gate) = mpsc::channel();
        let (done, synced) = mpsc::channel();
        GATES.lock().unwrap().push((dir.to_owned(), gate, done));
        (release, synced)
    }

    fn take(rotated: &Path) -> Option<Gate> {
        let mut gates = GATES.lock().unwrap();
        let index = gates
            .iter()
            .position(|(dir, _, _)| Some(dir.as_path()) == rotated.parent())?;
        Some(gates.remove(index))
    }

    /// Per log directory: told when a sync is about to start; then waits for the test's
    /// verdict (`Err`: the sync fails with that message).
    type CommitGate = (
        PathBuf,
        mpsc::Sender<()>,
        mpsc::Receiver<Result<(), String>>,
    );

    static COMMIT_GATES: Mutex<Vec<CommitGate>> = Mutex::new(Vec::new());

    /// Holds the next group commit's sync of a log in `dir`: `entered` hears when it is
    /// about to sync; the sync runs (or fails) when `release` gets a verdict.
    pub(super) fn hold_commit(
        dir: &Path,
    ) -> (mpsc::Receiver<()>, mpsc::Sender<Result<(), String>>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, verdict) = mpsc::channel();
        COMMIT_GATES
            .lock()
            .unwrap()
            .push((dir.to_owned(), entered_tx, verdict));
        (entered, release)
    }

    pub(super) fn before_commit(log: &Path) -> std::io::Result<()> {
        let gate = {
            let mut gates = COMMIT_GATES.lock().unwrap();
            gates
                .iter()
                .position(|(dir, _, _)| Some(dir.as_path()) == log.parent())
                .map(|index| gates.remove(index))
        };
        let Some((_, entered, verdict)) = gate else {
            return Ok(());
        };
        let _ = entered.send(());
        match verdict.recv() {
            Ok(Err(message)) => Err(std::io::Error::other(message)),
            _ => Ok(()),
        }
    }

    thread_local! {
        static DONE: std::cell::RefCell<Option<mpsc::Sender<PathBuf>>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn before_retire(rotated: &Path) {
        if let Some((_, gate, done)) = take(rotated) {
            let _ = gate.recv();
            DONE.with(|d| *d.borrow_mut() = Some(done));
        }
    }

    pub(super) fn after_retire(rotated: &Path) {
        if let Some(done) = DONE.with(|d| d.borrow_mut().take()) {
            let _ = done.send(rotated.to_owned());
        }
    }
}

/// `.<name>.lock` beside the log `path`: the file [`AuditLog`] locks.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".lock");
    path.with_file_name(name)
}

/// How long [`lock`] retries a held lock before naming its holder.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// Takes the exclusive lock of the log `path` and writes this process's id into the lock
/// file (for the message a second writer gets). An advisory `flock`: it keeps out other
/// Arbiter servers, not someone who edits the file by hand (that is what the chain is for).
/// The kernel releases it when the process dies, so a crash never leaves a stale lock.
fn lock(path: &Path) -> Result<File, AuditError> {
    let lock = lock_path(path);
    let open_error = |e: io::Error| AuditError::Open {
        path: path.to_owned(),
        reason: format!("cannot open the lock file `{}`: {e}", lock.display()),
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(open_error)?;
    // A lock held only for a moment is not another writer: a process that forks (to start
    // a child) shares its open files with the child until the child's exec closes them, so
    // a log just closed by this very process can look locked for that long.
    let deadline = Instant::now() + LOCK_PATIENCE;
    let mut locked = file.try_lock();
    while matches!(locked, Err(TryLockError::WouldBlock)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        locked = file.try_lock();
    }
    match locked {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("process {pid}"),
                Err(_) => "another process".to_owned(),
            };
            return Err(AuditError::Locked {
                path: path.to_owned(),
                lock,
                holder,
            });
        }
        Err(TryLockError::Error(e)) => return Err(open_error(e)),
    }
    // Only a hint for the message above; the lock is what counts.
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(open_error)?;
    Ok(file)
}

/// Whether `file` has been removed from its directory (no name links to it any more).
fn deleted(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata().is_ok_and(|m| m.nlink() == 0)
}

/// Makes a rename or a new file in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// `<path>.<first seq, 20 digits>`: the name a full file is rotated to.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{first_seq:0SEQ_DIGITS$}"));
    path.with_file_name(name)
}

/// The rotated files of `path`, oldest first, with their first seq.
pub fn rotated_files(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(suffix) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|n| n.strip_prefix('.'))
        else {
            continue;
        };
        if suffix.len() == SEQ_DIGITS && suffix.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(seq) = suffix.parse() {
                files.push((seq, entry.path()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// What is in one log file.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Seq of the first complete record.
    pub first_seq: Option<u64>,
    /// Seq and hash of the last complete record.
    pub last: Option<(u64, String)>,
    /// Bytes of complete lines.
    pub complete_len: u64,
    /// Bytes after the last newline (a torn record).
    pub torn_bytes: u64,
}

/// Reads `path` and checks its first and last complete records.
pub(crate) fn scan(path: &Path) -> Result<Scan, AuditError> {
    let open_error = |e: io::Error| AuditError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(open_error)?;
    let complete_len = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let complete = &bytes[..complete_len];
    let mut scan = Scan {
        complete_len: complete_len as u64,
        torn_bytes: (bytes.len() - complete_len) as u64,
        ..Scan::default()
    };
    if complete.is_empty() {
        return Ok(scan);
    }
    let lines: Vec<&[u8]> = complete[..complete.len() - 1]
        .split(|b| *b == b'\n')
        .collect();
    let check = |index: usize| {
        let line = lines.get(index).copied().unwrap_or_default();
        record::check_line(line)
            .map(|link| (link.seq, link.hash.to_owned()))
            .map_err(|source| AuditError::Corrupt {
                path: path.to_owned(),
                line: index + 1,
                source,
            })
    };
    scan.first_seq = Some(check(0)?.0);
    scan.last = Some(check(lines.len() - 1)?);
    Ok(scan)
}

/// Refuses to continue a log that ends before, or differs at, its newest checkpoint. A
/// refusal, not a "chain break" record: continuing would make the server the one that
/// papers over the gap; whether the missing records are restored or a new chain is started
/// is a person's decision, made with the files kept as evidence. Returns the newest
/// checkpoint's seq (0: none).
fn check_against_checkpoint(path: &Path, head: u64, head_hash: &str) -> Result<u64, AuditError> {
    let file = checkpoint::checkpoints_path(path);
    let newest = checkpoint::last_checkpoint(&file).map_err(|e| AuditError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    match newest {
        Some(cp) if head < cp.seq => Err(AuditError::BehindCheckpoint {
            path: path.to_owned(),
            checkpoints: file,
            head,
            seq: cp.seq,
            ts: cp.ts,
        }),
        Some(cp) if head == cp.seq && head_hash != cp.hash => Err(AuditError::Rewritten {
            path: path.to_owned(),
            checkpoints: file,
            seq: cp.seq,
            signed: cp.hash,
        }),
        Some(cp) => Ok(cp.seq),
        None => Ok(0),
    }
}

/// Where the chain continues.
struct Chain {
    next_seq: u64,
    last_hash: String,
    active_len: u64,
    active_first_seq: Option<u64>,
}

fn recover(path: &Path, metrics: &AuditMetrics) -> Result<Chain, AuditError> {
    let open_error = |e: io::Error| AuditError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut chain = Chain {
        next_seq: 1,
        last_hash: GENESIS_HASH.to_owned(),
        active_len: 0,
        active_first_seq: None,
    };
    let rotated = rotated_files(path).map_err(open_error)?;
    if let Some((_, newest)) = rotated.last() {
        if let Some((seq, hash)) = scan(newest)?.last {
            chain.next_seq = seq + 1;
            chain.last_hash = hash;
        }
    }
    if !path.exists() {
        return Ok(chain);
    }
    let active = scan(path)?;
    if let Some((seq, hash)) = &active.last {
        chain.next_seq = seq + 1;
        chain.last_hash.clone_from(hash);
    }
    if active.torn_bytes == 0 {
        chain.active_len = active.complete_len;
        chain.active_first_seq = active.first_seq;
        return Ok(chain);
    }

    // A torn last line: the process died inside a write, so that record was never
    // acknowledged. Keep the file as it is (evidence, never "repaired") and continue the
    // chain from the last complete record in a new file.
    metrics.torn_tails.inc();
    let aside = match active.first_seq {
        Some(first) => rotated_name(path, first),
        None => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".{:0SEQ_DIGITS$}.torn", chain.next_seq));
            path.with_file_name(name)
        }
    };
    if aside.exists() {
        return Err(AuditError::Open {
            path: path.to_owned(),
            reason: format!(
                "it ends with a torn record and `{}` already exists",
                aside.display()
            ),
        });
    }
    std::fs::rename(path, &aside).map_err(open_error)?;
    sync_dir(path).map_err(open_error)?;
    tracing::warn!(
        path = %path.display(),
        kept_as = %aside.display(),
        torn_bytes = active.torn_bytes,
        next_seq = chain.next_seq,
        "audit log ends with a torn record (a crash while writing; it was never acknowledged): file kept as is, chain continues in a new file"
    );
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Reason, Verdict};
    use std::future::Future as _;
    use std::task::Poll;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            ts: "2026-11-30T10:00:00.000001Z".into(),
            request_time: None,
            id: format!("id-{i}"),
            request_id: format!("r-{i}"),
            decision: Verdict::Allow,
            dry_run: false,
            reason: Reason::Permit,
            policy_version: "sha256:0".into(),
            policy_ids: vec!["p".into()],
            shadow_decision: None,
            principal: "anonymous".into(),
            action: "chat.completions".into(),
            route: "chat".into(),
            route_context: Default::default(),
            method: "POST".into(),
            scheme: "http".into(),
            host: "gw".into(),
            path: "/v1/chat/completions".into(),
            source: None,
            identity: None,
            headers: Default::default(),
            headers_omitted: None,
            model: None,
            body_bytes: None,
            body_size_known: None,
            body_truncated: None,
            body_parse_error: None,
            stream: None,
            max_tokens: None,
            message_count: None,
            prompt_sha256: None,
            trace_id: None,
            latency_us: 1,
            cut: Default::default(),
        }
    }

    /// `(batches, records)` the writer has written, from its metrics.
    fn batches(metrics: &AuditMetrics) -> (u64, u64) {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
        };
        (
            value("audit_batch_records_count"),
            value("audit_records_written_total"),
        )
    }

    #[tokio::test]
    async fn a_deleted_active_file_is_replaced_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditConfig::new(&path), AuditMetrics::default()).unwrap();
        log.append(event(0)).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        // Acknowledged only once it is in a file at the path, the chain going on.
        let written = log.append(event(1)).await.unwrap();
        assert_eq!(written.seq, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("\"seq\":2"), "{text}");
    }

    #[tokio::test]
    async fn a_round_of_appends_is_handed_over_once_and_each_waits_for_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let metrics = AuditMetrics::default();
        let log = AuditLog::open(&AuditConfig::new(&path), metrics.clone()).unwrap();
        // Sixteen decisions ready in the same scheduler round (as sixteen streams of one
        // connection are): one hand-off, one group commit (one write, one fdatasync).
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(event(i)).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            let written = task.await.unwrap().unwrap();
            // Answered only once its record is in the file.
            let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
            assert!(
                lines >= written.seq,
                "seq {} answered with {lines} lines",
                written.seq
            );
            seqs.push(written.seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
        assert_eq!(batches(&metrics), (1, 16));
        // The next round is a batch of its own.
        log.append(event(16)).await.unwrap();
        assert_eq!(batches(&metrics), (2, 17));
    }

    /// Polls (bounded) until the file at `path` holds `lines` complete lines.
    async fn wait_for_lines(path: &Path, lines: usize, what: &str) {
        let polled = tokio::time::timeout(Duration::from_secs(30), async {
            while std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .count()
                < lines
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let now = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count();
        assert!(polled.is_ok(), "{what}: {now} lines, expected {lines}");
    }

    fn spawn_appends(
        log: &AuditLog,
        range: std::ops::Range<usize>,
    ) -> Vec<tokio::task::JoinHandle<Result<Written, AuditError>>> {
        range
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(event(i)).await })
            })
            .collect()
    }

    /// `fsync` mode pipelines: while one group's sync runs, the next decisions are written
    /// (not answered), and one more sync covers them all. Nothing is answered before a sync
    /// that began after its write.
    #[tokio::test]
    async fn fsync_mode_writes_the_next_batch_while_a_sync_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let metrics = AuditMetrics::default();
        let log = AuditLog::open(&AuditConfig::new(&path), metrics.clone()).unwrap();
        let (entered, release) = test_gate::hold_commit(dir.path());
        let first = spawn_appends(&log, 0..1);
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the first record's sync starts");
        // Sixteen decisions while that sync is held: written, none answered.
        let next = spawn_appends(&log, 1..17);
        wait_for_lines(&path, 17, "the next batch is written during the sync").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            first.iter().chain(&next).all(|task| !task.is_finished()),
            "a record was answered before its sync"
        );
        assert_eq!(*log.written().borrow(), 0);
        release.send(Ok(())).unwrap();
        let mut seqs = Vec::new();
        for task in first.into_iter().chain(next) {
            seqs.push(task.await.unwrap().unwrap().seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=17).collect::<Vec<u64>>());
        // Two syncs: the held one (1 record) and one for the 16 written meanwhile.
        assert_eq!(batches(&metrics), (2, 17));
        assert_eq!(*log.written().borrow(), 17);
        drop(log);
        let report = crate::verify::verify(&[path]).unwrap();
        assert!(report.ok() && report.records == 17, "{report:?}");
    }

    /// A failed sync refuses its records and every record written after them (their chain
    /// runs through the refused ones), cuts the file back to the last synced record and
    /// continues the chain from there.
    #[tokio::test]
    async fn a_failed_sync_refuses_everything_unsynced_and_the_chain_goes_on_from_the_last_synced()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let metrics = AuditMetrics::default();
        let log = AuditLog::open(&AuditConfig::new(&path), metrics.clone()).unwrap();
        assert_eq!(log.append(event(0)).await.unwrap().seq, 1);
        let synced_len = std::fs::metadata(&path).unwrap().len();
        let (entered, release) = test_gate::hold_commit(dir.path());
        let held = spawn_appends(&log, 1..2);
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
        let later = spawn_appends(&log, 2..6);
        wait_for_lines(&path, 6, "written during the held sync").await;
        release.send(Err("injected sync failure".into())).unwrap();
        for task in held.into_iter().chain(later) {
            let result = task.await.unwrap();
            assert!(
                matches!(&result, Err(AuditError::Write { reason, .. }) if reason.contains("injected")),
                "{result:?}"
            );
        }
        assert_eq!(metrics.write_errors.get(), 1);
        // The next decision goes after the last synced record, in its place.
        assert_eq!(log.append(event(6)).await.unwrap().seq, 2);
        tokio::time::timeout(Duration::from_secs(30), log.writable().wait_for(|w| *w))
            .await
            .expect("writable again")
            .unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.len() as u64 > synced_len);
        assert!(
            text.lines().nth(1).unwrap().contains("\"id\":\"id-6\""),
            "{text}"
        );
        let report = crate::verify::verify(&[path]).unwrap();
        assert!(report.ok() && report.records == 2, "{report:?}");
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_still_gets_its_record_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let metrics = AuditMetrics::default();
        let log = AuditLog::open(&AuditConfig::new(&path), metrics.clone()).unwrap();
        // Polled once (the event joins the pending list), then dropped before it is handed
        // over: the log, not the caller, owns the pending list.
        // Exactly one poll, then the future is dropped (a zero timeout is not that: Tokio's
        // timer may not count a zero deadline as passed until it ticks, and the append can
        // finish in between; seen failing on an idle machine).
        let mut append = Box::pin(log.append(event(0)));
        let first = std::future::poll_fn(|cx| Poll::Ready(append.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "the append cannot have finished without yielding"
        );
        drop(append);
        let mut written = log.written();
        tokio::time::timeout(Duration::from_secs(30), written.wait_for(|seq| *seq >= 1))
            .await
            .expect("the abandoned record is written")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        // And a log dropped while an event is pending writes it on the way out.
        let mut append = Box::pin(log.append(event(1)));
        let first = std::future::poll_fn(|cx| Poll::Ready(append.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        drop(append);
        drop(log);
        drop(written);
        // The spawned hand-off task may hold the last handle; let it run, then reopen.
        tokio::task::yield_now().await;
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if std::fs::read_to_string(&path).unwrap().lines().count() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the pending record is written when the log goes away");
        assert_eq!(metrics.queue_depth.get(), 0);
    }

    /// The sync of a file rotated out is not on any decision's path: with that sync held,
    /// decisions after the rotation are written to the new file and answered; the held sync
    /// still runs, before the log is closed; the chain is whole. In both sync modes.
    #[tokio::test]
    async fn decisions_go_on_in_the_new_file_while_the_rotated_one_is_synced() {
        for sync in [AuditSync::Write, AuditSync::Fsync] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.jsonl");
            let config = AuditConfig {
                path: path.clone(),
                sync,
                max_bytes: 2048,
                checkpoints: None,
            };
            let metrics = AuditMetrics::default();
            let (release, synced) = test_gate::hold(dir.path());
            let log = AuditLog::open(&config, metrics.clone()).unwrap();
            // One batch after another until the file is full (a record is ~600 bytes).
            let mut i = 0;
            while std::fs::metadata(&path).unwrap().len() < 2048 {
                log.append(event(i)).await.unwrap();
                i += 1;
            }
            let first_file = i as u64;
            // The next batch rotates; sixteen decisions during the held sync.
            let tasks: Vec<_> = (i..i + 16)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move { log.append(event(i)).await })
                })
                .collect();
            for task in tasks {
                let written = tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{sync:?}: a decision waited for the rotated file's sync")
                    })
                    .unwrap()
                    .unwrap();
                assert!(written.seq > first_file, "{sync:?}: {written:?}");
            }
            assert_eq!(metrics.rotations.get(), 1, "{sync:?}");
            let rotated = rotated_name(&path, 1);
            assert_eq!(
                std::fs::read_to_string(&rotated).unwrap().lines().count() as u64,
                first_file,
                "{sync:?}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).unwrap().lines().count(),
                16,
                "{sync:?}: the decisions are in the new file"
            );
            assert!(
                matches!(synced.try_recv(), Err(mpsc::TryRecvError::Empty)),
                "{sync:?}: the rotated file's sync ran before it was released"
            );
            release.send(()).unwrap();
            assert_eq!(
                synced.recv_timeout(Duration::from_secs(30)).unwrap(),
                rotated,
                "{sync:?}"
            );
            drop(log);
            let report = crate::verify::verify(&[rotated, path.clone()]).unwrap();
            assert!(report.ok(), "{sync:?}: {report:?}");
            assert_eq!(
                (report.first_seq, report.last_seq, report.records),
                (Some(1), Some(first_file + 16), first_file + 16),
                "{sync:?}"
            );
        }
    }

    /// Closing the log waits for a rotated file's sync still queued: the writer's last
    /// handle gone means every file synced and the lock free.
    #[tokio::test]
    async fn closing_the_log_waits_for_the_rotated_files_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            path: path.clone(),
            sync: AuditSync::Write,
            max_bytes: 600,
            checkpoints: None,
        };
        let (release, synced) = test_gate::hold(dir.path());
        let log = AuditLog::open(&config, AuditMetrics::default()).unwrap();
        for i in 0..3 {
            log.append(event(i)).await.unwrap();
        }
        let closing = std::thread::spawn(move || drop(log));
        // While the sync is held the writer still holds the lock (a second open waits for
        // it, then refuses).
        let err = AuditLog::open(&config, AuditMetrics::default()).unwrap_err();
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
        assert!(!closing.is_finished());
        release.send(()).unwrap();
        closing.join().unwrap();
        assert_eq!(synced.try_recv().unwrap(), rotated_name(&path, 1));
        AuditLog::open(&config, AuditMetrics::default()).unwrap();
    }

    #[tokio::test]
    async fn one_writer_per_log_and_the_lock_goes_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig::new(dir.path().join("audit.jsonl"));
        let first = AuditLog::open(&config, AuditMetrics::default()).unwrap();
        let clone = first.clone();
        let err = AuditLog::open(&config, AuditMetrics::default()).unwrap_err();
        let expected = format!("is already written by process {}", std::process::id());
        assert!(
            matches!(err, AuditError::Locked { .. }) && err.to_string().contains(&expected),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "only the log and its lock"
        );
        drop(first);
        // A clone still holds the writer, so still locked.
        assert!(AuditLog::open(&config, AuditMetrics::default()).is_err());
        drop(clone);
        AuditLog::open(&config, AuditMetrics::default()).unwrap();
        assert_eq!(
            lock_path(&config.path),
            dir.path().join(".audit.jsonl.lock")
        );
    }
}
