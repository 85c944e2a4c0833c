//! OTLP export: ships audit records as OTLP logs over gRPC, read back from the local log.
//!
//! The local log is the outbox. A task reads the records after the saved position (a seq,
//! kept in a small file), sends them in batches and saves the new position once the
//! receiver acknowledged them. Decisions never wait for it; a receiver outage only delays
//! the export. A crash between the acknowledgement and the save sends a batch again
//! (at-least-once): receivers spot duplicates by the `arbiter.audit.id` attribute.
//!
//! Signed checkpoints (`<log>.checkpoints`) go out too, each once the records it covers
//! were acknowledged, as log records with event name [`CHECKPOINT_EVENT_NAME`] and the
//! checkpoint line as body, so a copy off the host can vouch for the local file. Their
//! position is kept in memory only: after a restart every checkpoint is sent again (a
//! duplicate has the same `arbiter.audit.checkpoint.seq` and signature).

use std::fs::File;
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_client::LogsServiceClient, ExportLogsServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::checkpoint::Checkpoint;
use super::metrics::AuditMetrics;
use super::record::{self, AuditRecord};
use super::writer::{rotated_files, rotated_name};

/// `service.name` of the exported resource.
pub const SERVICE_NAME: &str = "arbiter-policy-server";
/// Instrumentation scope name of the exported records.
pub const SCOPE_NAME: &str = "arbiter.audit";
/// `event_name` of every exported record.
pub const EVENT_NAME: &str = "arbiter.decision";
/// `event_name` of an exported checkpoint.
pub const CHECKPOINT_EVENT_NAME: &str = "arbiter.audit.checkpoint";
/// Records per export call.
const BATCH: usize = 256;
/// Bound on one export call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between attempts while the receiver is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Look for new records at least this often even without a signal from the writer.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint is not a valid URI.
    #[error("invalid OTLP endpoint `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// Where to export from and to.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// OTLP/gRPC receiver, e.g. `http://collector:4317`.
    pub endpoint: String,
    /// The audit log's active file.
    pub log_path: PathBuf,
    /// File holding the last exported seq.
    pub position_path: PathBuf,
}

impl ExportConfig {
    /// Exports `log_path` to `endpoint`, keeping the position in `<log_path>.otlp-position`.
    pub fn new(endpoint: impl Into<String>, log_path: impl Into<PathBuf>) -> Self {
        let log_path = log_path.into();
        let mut position = log_path.file_name().unwrap_or_default().to_os_string();
        position.push(".otlp-position");
        Self {
            endpoint: endpoint.into(),
            position_path: log_path.with_file_name(position),
            log_path,
        }
    }
}

/// The running exporter.
pub struct Exporter {
    config: ExportConfig,
    client: LogsServiceClient<Channel>,
    metrics: AuditMetrics,
    cursor: Option<Cursor>,
    /// Seq of the newest checkpoint acknowledged by the receiver in this run.
    checkpoint_sent: u64,
}

/// Where reading stopped: a file (named by its first seq, stable across rotation) and an
/// offset in it.
#[derive(Debug, Clone)]
struct Cursor {
    first_seq: u64,
    offset: u64,
}

impl Exporter {
    /// Checks the endpoint; connects lazily (the receiver may be down at start).
    pub fn new(config: ExportConfig, metrics: AuditMetrics) -> Result<Self, ExportError> {
        let endpoint_error = |reason: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let client = LogsServiceClient::new(endpoint.connect_lazy());
        Ok(Self {
            config,
            client,
            metrics,
            cursor: None,
            checkpoint_sent: 0,
        })
    }

    /// Exports forever: wakes when `written` moves (or every second), sends what is new,
    /// retries with back-off while the receiver fails.
    pub async fn run(mut self, mut written: watch::Receiver<u64>) {
        let mut position = read_position(&self.config.position_path);
        self.metrics
            .otlp_position
            .set(i64::try_from(position).unwrap_or(i64::MAX));
        let mut backoff = Duration::from_millis(100);
        loop {
            // Only records the writer has finished (fsynced in `fsync` mode): a record whose
            // write then failed is cut from the file and must not have been shipped.
            let durable = *written.borrow_and_update();
            let batch = match self.read_batch(position, durable) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(path = %self.config.log_path.display(), "cannot read the audit log for export: {e}");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                // Checkpoints of exported records (one may come after its records: interval,
                // shutdown).
                self.export_checkpoints(position).await;
                // Wait for the writer, or poll (a rotation or a restart may need a look).
                if let Ok(Err(_)) = tokio::time::timeout(IDLE_POLL, written.changed()).await {
                    // The writer is gone (shutting down): nothing new will come but its
                    // shutdown checkpoint, written before it went.
                    self.export_checkpoints(position).await;
                    return;
                }
                continue;
            }
            let last = batch.iter().map(|(seq, _)| *seq).max().unwrap_or(position);
            let count = batch.len() as u64;
            match self.send(batch).await {
                Ok(()) => {
                    position = last;
                    self.metrics.otlp_exported.inc_by(count);
                    self.metrics
                        .otlp_position
                        .set(i64::try_from(position).unwrap_or(i64::MAX));
                    if let Err(e) = save_position(&self.config.position_path, position) {
                        tracing::warn!(path = %self.config.position_path.display(), "cannot save the OTLP export position (records may be sent again): {e}");
                    }
                    backoff = Duration::from_millis(100);
                }
                Err(status) => {
                    self.metrics.otlp_errors.inc();
                    tracing::warn!(endpoint = %self.config.endpoint, position, "OTLP export failed, retrying in {backoff:?}: {status}");
                    // Read the same records again next time.
                    self.cursor = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sends the checkpoints of seq <= `position` not sent yet; a failure is retried on the
    /// next call.
    async fn export_checkpoints(&mut self, position: u64) {
        let path = crate::checkpoint::checkpoints_path(&self.config.log_path);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let mut batch = Vec::new();
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(cp) = Checkpoint::parse(line) else {
                continue;
            };
            if cp.seq > self.checkpoint_sent && cp.seq <= position {
                batch.push((
                    cp.seq,
                    checkpoint_record(&cp, String::from_utf8_lossy(line).into_owned()),
                ));
            }
        }
        let Some(newest) = batch.iter().map(|(seq, _)| *seq).max() else {
            return;
        };
        match self.send(batch).await {
            Ok(()) => self.checkpoint_sent = newest,
            Err(status) => {
                self.metrics.otlp_errors.inc();
                tracing::warn!(endpoint = %self.config.endpoint, "OTLP export of audit checkpoints failed, retrying: {status}");
            }
        }
    }

    async fn send(&mut self, batch: Vec<(u64, LogRecord)>) -> Result<(), tonic::Status> {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![string_attr("service.name", SERVICE_NAME)],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records: batch.into_iter().map(|(_, record)| record).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let response = self.client.export(request).await?.into_inner();
        // A partial success with rejected records is an error here: retrying is the only way
        // not to lose them.
        match response.partial_success {
            Some(partial) if partial.rejected_log_records > 0 => {
                Err(tonic::Status::data_loss(format!(
                    "receiver rejected {} records: {}",
                    partial.rejected_log_records, partial.error_message
                )))
            }
            _ => Ok(()),
        }
    }

    /// Up to [`BATCH`] records with `position` < seq <= `durable`, in order.
    fn read_batch(
        &mut self,
        position: u64,
        durable: u64,
    ) -> std::io::Result<Vec<(u64, LogRecord)>> {
        if durable <= position {
            return Ok(Vec::new());
        }
        let mut batch = Vec::new();
        // A few files at most per call: each pass reads one.
        for _ in 0..4 {
            let cursor = match self.cursor.take() {
                Some(cursor) => cursor,
                None => match self.locate(position + 1)? {
                    Some(cursor) => cursor,
                    None => return Ok(batch),
                },
            };
            let Some((path, is_active)) = self.path_of(cursor.first_seq) else {
                continue;
            };
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(cursor.offset))?;
            let mut reader = BufReader::new(file);
            let mut offset = cursor.offset;
            let mut line = Vec::new();
            while batch.len() < BATCH {
                line.clear();
                let read = reader.read_until(b'\n', &mut line)?;
                if read == 0 || line.last() != Some(&b'\n') {
                    // End of the file, or a line still being written (or torn).
                    break;
                }
                let bytes = &line[..line.len() - 1];
                let parsed = record::parse_line(bytes);
                if matches!(&parsed, Ok(record) if record.seq > durable) {
                    // Written but not yet acknowledged by the writer: read it next time.
                    break;
                }
                offset += read as u64;
                match parsed {
                    Ok(record) if record.seq > position => {
                        let text = String::from_utf8_lossy(bytes).into_owned();
                        batch.push((record.seq, log_record(&record, text)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), offset, "not exported, invalid audit record: {e}")
                    }
                }
            }
            self.cursor = Some(Cursor {
                first_seq: cursor.first_seq,
                offset,
            });
            if !batch.is_empty() || is_active {
                return Ok(batch);
            }
            // A rotated file read to its end: go on with the file holding the next record.
            match self.locate(position + 1)? {
                Some(next) if next.first_seq != cursor.first_seq => self.cursor = Some(next),
                _ => return Ok(batch),
            }
        }
        Ok(batch)
    }

    /// The file holding `seq`: the newest one starting at or before it.
    fn locate(&self, seq: u64) -> std::io::Result<Option<Cursor>> {
        let mut files: Vec<u64> = rotated_files(&self.config.log_path)?
            .into_iter()
            .map(|(first, _)| first)
            .collect();
        if let Some(first) = first_seq_of(&self.config.log_path) {
            files.push(first);
        }
        files.sort_unstable();
        let chosen = files
            .iter()
            .rev()
            .find(|first| **first <= seq)
            .or_else(|| files.first());
        Ok(chosen.map(|first| Cursor {
            first_seq: *first,
            offset: 0,
        }))
    }

    /// The current path of the file starting at `first_seq`, and whether it is the active one.
    fn path_of(&self, first_seq: u64) -> Option<(PathBuf, bool)> {
        if first_seq_of(&self.config.log_path) == Some(first_seq) {
            return Some((self.config.log_path.clone(), true));
        }
        let rotated = rotated_name(&self.config.log_path, first_seq);
        rotated.exists().then_some((rotated, false))
    }
}

fn first_seq_of(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut line = Vec::new();
    BufReader::new(file).read_until(b'\n', &mut line).ok()?;
    let bytes = line.strip_suffix(b"\n")?;
    record::check_line(bytes).ok().map(|link| link.seq)
}

fn read_position(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "invalid OTLP export position, exporting from the start");
            0
        }),
        Err(_) => 0,
    }
}

fn save_position(path: &Path, seq: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{seq}\n"))?;
    std::fs::rename(&tmp, path)
}

fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int_attr(key: &str, value: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(
                i64::try_from(value).unwrap_or(i64::MAX),
            )),
        }),
        ..Default::default()
    }
}

/// The OTLP log record of a checkpoint `line` (the whole line, signature included).
pub fn checkpoint_record(cp: &Checkpoint, line: String) -> LogRecord {
    let time_unix_nano = OffsetDateTime::parse(&cp.ts, &Rfc3339)
        .ok()
        .and_then(|t| u64::try_from(t.unix_timestamp_nanos()).ok())
        .unwrap_or(0);
    LogRecord {
        time_unix_nano,
        severity_number: SeverityNumber::Info.into(),
        severity_text: "INFO".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(line)),
        }),
        attributes: vec![
            int_attr("arbiter.audit.checkpoint.seq", cp.seq),
            string_attr("arbiter.audit.checkpoint.hash", &cp.hash),
            string_attr("arbiter.audit.checkpoint.key_id", &cp.key_id),
        ],
        event_name: CHECKPOINT_EVENT_NAME.into(),
        ..Default::default()
    }
}

/// The OTLP log record of an audit record: the line itself as the body (so a collector keeps
/// what the hash covers) and the fields to search by as attributes.
pub fn log_record(record: &AuditRecord, line: String) -> LogRecord {
    let event = &record.event;
    let time_unix_nano = OffsetDateTime::parse(&event.ts, &Rfc3339)
        .ok()
        .and_then(|t| u64::try_from(t.unix_timestamp_nanos()).ok())
        .unwrap_or(0);
    let observed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let trace_id = event
        .trace_id
        .as_deref()
        .and_then(|t| hex::decode(t).ok())
        .filter(|t| t.len() == 16)
        .unwrap_or_default();
    let mut attributes = vec![
        string_attr("arbiter.audit.id", &event.id),
        int_attr("arbiter.audit.seq", record.seq),
        string_attr("arbiter.audit.hash", &record.hash),
        string_attr("arbiter.decision", event.decision.as_str()),
        // `allow`, `deny` or `dry_run_deny` (not enforced): what happened to the request.
        string_attr("arbiter.outcome", event.outcome()),
        string_attr("arbiter.policy_version", &event.policy_version),
        string_attr("arbiter.route", &event.route),
        string_attr("arbiter.principal", &event.principal),
        string_attr("arbiter.request_id", &event.request_id),
        string_attr("http.request.method", &event.method),
        string_attr("url.path", &event.path),
    ];
    if !event.policy_ids.is_empty() {
        attributes.push(string_attr(
            "arbiter.policy_ids",
            &event.policy_ids.join(","),
        ));
    }
    LogRecord {
        time_unix_nano,
        observed_time_unix_nano: observed,
        severity_number: SeverityNumber::Info.into(),
        severity_text: "INFO".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(line)),
        }),
        attributes,
        trace_id,
        event_name: EVENT_NAME.into(),
        ..Default::default()
    }
}
