//! The on-disk outbox: every report, alert, tool call and gate event is written here before it is
//! published, and removed only once the broker has acknowledged it, so that neither a broker
//! outage nor a power cut loses one.
//!
//! Layout of the directory:
//! - `segment-<generation>.log`: messages, appended and synced one by one. Each record is
//!   `length (u32 LE) | crc32 of the body (u32 LE) | body`, the body a JSON [`StoredMessage`].
//!   A new segment starts when the current one passes `segment_bytes`; a segment whose messages
//!   have all been acknowledged is deleted.
//! - `acked.log`: sequence numbers of acknowledged (or dropped) messages, same framing, not
//!   synced: an acknowledgement lost in a crash only means the message is sent again, and
//!   consumers drop the copy by its id.
//! - `lock`: held (`flock`) while a daemon uses the directory, so two cannot share it.
//!
//! A record cut short or garbled by a crash is detected by its length and checksum; the rest of
//! that segment is skipped with a warning and every record before it is kept. On open, what is
//! still unacknowledged is rewritten into one fresh segment and the old files are deleted.
//!
//! The outbox has a size cap on the unacknowledged messages it holds. Past it, the oldest message
//! of the lowest priority goes first (gate events, then reports from the least to the most
//! severe, then alerts and tool calls), counted and logged.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 1 << 20;
/// A record longer than this is not a record: the length field itself is garbage.
const MAX_RECORD_BYTES: u32 = 64 << 20;
const HEADER_BYTES: u64 = 8;
/// Past this size of the acknowledgement log, the outbox is compacted.
const ACK_LOG_COMPACT_BYTES: u64 = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create the outbox directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error(
        "the outbox directory {dir} is in use by another outpostd (its lock file is held); \
         give each daemon its own `[outbox] dir` or station id"
    )]
    InUse { dir: PathBuf },
    #[error("outbox file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("a message of {bytes} bytes is larger than the outbox's cap of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
}

/// How much a message matters when the outbox is full: lower goes first.
pub type Priority = u8;
/// Gate events: plenty of them, each says little.
pub const PRIORITY_EVENT: Priority = 0;
/// Scene reports add their severity (0-3) to this.
pub const PRIORITY_REPORT: Priority = 1;
/// Alerts and tool calls: someone is to act on them.
pub const PRIORITY_ACTION: Priority = 5;

/// A message as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub seq: u64,
    pub topic: String,
    pub payload: String,
    pub priority: Priority,
    /// When the message was made, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl StoredMessage {
    pub fn created_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.created_ms)
    }
}

/// Where each unacknowledged message lives, without its payload (the publisher holds that).
#[derive(Debug, Clone, Copy)]
struct Slot {
    generation: u64,
    bytes: u64,
    priority: Priority,
}

#[derive(Debug)]
struct Segment {
    generation: u64,
    /// Messages in it not yet acknowledged.
    live: usize,
    bytes: u64,
}

pub struct Outbox {
    dir: PathBuf,
    _lock: File,
    max_bytes: u64,
    segment_bytes: u64,
    segments: Vec<Segment>,
    active: File,
    acks: File,
    ack_log_bytes: u64,
    index: BTreeMap<u64, Slot>,
    live_bytes: u64,
    next_seq: u64,
    dropped: u64,
}

impl Outbox {
    /// Opens (creating it if need be) the outbox in `dir` and returns it with the messages a
    /// previous run left unacknowledged, oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Vec<StoredMessage>), OutboxError> {
        Self::open_with_segment_bytes(dir, max_bytes, SEGMENT_BYTES)
    }

    fn open_with_segment_bytes(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Vec<StoredMessage>), OutboxError> {
        fs::create_dir_all(dir).map_err(|source| OutboxError::CreateDir { dir: dir.to_owned(), source })?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OutboxError::InUse { dir: dir.to_owned() }),
            Err(fs::TryLockError::Error(source)) => return Err(OutboxError::Io { path: lock_path, source }),
        }

        let acked = read_ack_log(&dir.join("acked.log"))?;
        let old_segments = segment_files(dir)?;
        let mut held = BTreeMap::new();
        for (_, path) in &old_segments {
            for message in read_segment(path)? {
                if !acked.contains(&message.seq) {
                    held.insert(message.seq, message);
                }
            }
        }
        let generation = old_segments.last().map_or(0, |(generation, _)| generation + 1);
        let next_seq = held.keys().next_back().map_or(0, |seq| seq + 1);

        // What is held goes into one fresh segment, written and synced before the old files go:
        // a crash in between leaves both, and the copies share their sequence numbers.
        let active_path = segment_path(dir, generation);
        let mut active = create_file(&active_path)?;
        let mut segment = Segment { generation, live: 0, bytes: 0 };
        let mut index = BTreeMap::new();
        let mut live_bytes = 0;
        let mut frames = Vec::new();
        for message in held.values() {
            let record = frame(&serde_json::to_vec(message).unwrap_or_default());
            let bytes = record.len() as u64;
            index.insert(message.seq, Slot { generation, bytes, priority: message.priority });
            segment.live += 1;
            segment.bytes += bytes;
            live_bytes += bytes;
            frames.extend_from_slice(&record);
        }
        active.write_all(&frames).and_then(|()| active.sync_data()).map_err(io_error(&active_path))?;
        sync_dir(dir)?;
        for (_, path) in &old_segments {
            fs::remove_file(path).map_err(io_error(path))?;
        }
        let ack_path = dir.join("acked.log");
        let acks = File::create(&ack_path).map_err(io_error(&ack_path))?;
        sync_dir(dir)?;

        let mut outbox = Self {
            dir: dir.to_owned(),
            _lock: lock,
            max_bytes,
            segment_bytes,
            segments: vec![segment],
            active,
            acks,
            ack_log_bytes: 0,
            index,
            live_bytes,
            next_seq,
            dropped: 0,
        };
        let dropped = outbox.enforce_cap()?;
        let held = held.into_values().filter(|m| !dropped.contains(&m.seq)).collect();
        Ok((outbox, held))
    }

    /// Writes a message and syncs it to disk. Returns its sequence number and those of the
    /// messages dropped to stay under the cap (possibly this one, when all others matter more).
    pub fn append(
        &mut self,
        topic: &str,
        payload: &str,
        priority: Priority,
        created_at: SystemTime,
    ) -> Result<(StoredMessage, Vec<u64>), OutboxError> {
        let created_ms = created_at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let message = StoredMessage {
            seq: self.next_seq,
            topic: topic.to_owned(),
            payload: payload.to_owned(),
            priority,
            created_ms,
        };
        let frame = frame(&serde_json::to_vec(&message).unwrap_or_default());
        let bytes = frame.len() as u64;
        if bytes > self.max_bytes {
            return Err(OutboxError::TooLarge { bytes, max: self.max_bytes });
        }
        if self.segments.last().is_some_and(|s| s.bytes > 0 && s.bytes + bytes > self.segment_bytes) {
            self.rotate()?;
        }
        let path = self.active_path();
        self.active.write_all(&frame).and_then(|()| self.active.sync_data()).map_err(io_error(&path))?;
        self.next_seq += 1;
        let Some(segment) = self.segments.last_mut() else { unreachable!("the active segment is always listed") };
        segment.live += 1;
        segment.bytes += bytes;
        self.index.insert(message.seq, Slot { generation: segment.generation, bytes, priority });
        self.live_bytes += bytes;
        let dropped = self.enforce_cap()?;
        Ok((message, dropped))
    }

    /// The broker has the message: forget it.
    pub fn acknowledge(&mut self, seq: u64) -> Result<(), OutboxError> {
        if !self.forget(seq) {
            return Ok(());
        }
        let path = self.dir.join("acked.log");
        let record = frame(&seq.to_le_bytes());
        self.acks.write_all(&record).map_err(io_error(&path))?;
        self.ack_log_bytes += record.len() as u64;
        self.delete_finished_segments()?;
        if self.ack_log_bytes > ACK_LOG_COMPACT_BYTES || self.disk_bytes() > 2 * self.max_bytes + self.segment_bytes {
            self.compact()?;
        }
        Ok(())
    }

    /// Unacknowledged messages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of unacknowledged messages held (what the cap limits).
    pub fn bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Messages dropped to stay under the cap since the outbox was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes `seq` from the index; false when it was not held.
    fn forget(&mut self, seq: u64) -> bool {
        let Some(slot) = self.index.remove(&seq) else { return false };
        self.live_bytes -= slot.bytes;
        if let Some(segment) = self.segments.iter_mut().find(|s| s.generation == slot.generation) {
            segment.live -= 1;
        }
        true
    }

    /// Drops the oldest of the lowest-priority messages until the held bytes fit the cap.
    fn enforce_cap(&mut self) -> Result<Vec<u64>, OutboxError> {
        let mut dropped = Vec::new();
        while self.live_bytes > self.max_bytes {
            let Some((&seq, slot)) = self.index.iter().min_by_key(|(&seq, slot)| (slot.priority, seq)) else { break };
            warn!(
                "outbox {} is over its cap of {} bytes: dropping message {seq} (priority {})",
                self.dir.display(),
                self.max_bytes,
                slot.priority
            );
            self.acknowledge(seq)?;
            self.dropped += 1;
            dropped.push(seq);
        }
        Ok(dropped)
    }

    fn rotate(&mut self) -> Result<(), OutboxError> {
        let generation = self.segments.last().map_or(0, |s| s.generation + 1);
        let path = segment_path(&self.dir, generation);
        self.active = create_file(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment { generation, live: 0, bytes: 0 });
        debug!("outbox: started {}", path.display());
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        segment_path(&self.dir, self.segments.last().map_or(0, |s| s.generation))
    }

    /// Deletes closed segments with nothing left to deliver.
    fn delete_finished_segments(&mut self) -> Result<(), OutboxError> {
        let active = self.segments.last().map(|s| s.generation);
        let mut deleted = false;
        for segment in self.segments.iter().filter(|s| s.live == 0 && Some(s.generation) != active) {
            let path = segment_path(&self.dir, segment.generation);
            fs::remove_file(&path).map_err(io_error(&path))?;
            deleted = true;
        }
        self.segments.retain(|s| s.live > 0 || Some(s.generation) == active);
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Rewrites what is still unacknowledged into one fresh segment, then deletes the older
    /// segments and empties the acknowledgement log. Run when that log or the segments have grown
    /// (one message stuck behind a dead link keeps its whole segment, and every acknowledgement
    /// after it, on disk).
    fn compact(&mut self) -> Result<(), OutboxError> {
        let mut live = BTreeMap::new();
        for segment in &self.segments {
            for message in read_segment(&segment_path(&self.dir, segment.generation))? {
                if self.index.contains_key(&message.seq) {
                    live.insert(message.seq, message);
                }
            }
        }
        for seq in self.index.keys().copied().collect::<Vec<_>>() {
            if !live.contains_key(&seq) {
                warn!("outbox {}: message {seq} could not be read back; it is lost", self.dir.display());
                self.forget(seq);
            }
        }
        let generation = self.segments.last().map_or(0, |s| s.generation + 1);
        let path = segment_path(&self.dir, generation);
        let mut records = Vec::new();
        let mut segment = Segment { generation, live: 0, bytes: 0 };
        for message in live.values() {
            let record = frame(&serde_json::to_vec(message).unwrap_or_default());
            if let Some(slot) = self.index.get_mut(&message.seq) {
                slot.generation = generation;
            }
            segment.live += 1;
            segment.bytes += record.len() as u64;
            records.extend_from_slice(&record);
        }
        let mut active = create_file(&path)?;
        active.write_all(&records).and_then(|()| active.sync_data()).map_err(io_error(&path))?;
        sync_dir(&self.dir)?;
        for old in &self.segments {
            let old_path = segment_path(&self.dir, old.generation);
            fs::remove_file(&old_path).map_err(io_error(&old_path))?;
        }
        let ack_path = self.dir.join("acked.log");
        self.acks = File::create(&ack_path).map_err(io_error(&ack_path))?;
        sync_dir(&self.dir)?;
        debug!("outbox: compacted {} messages into {}", segment.live, path.display());
        self.active = active;
        self.segments = vec![segment];
        self.ack_log_bytes = 0;
        Ok(())
    }

    /// Bytes of segments on disk, acknowledged messages included.
    fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io { path: path.to_owned(), source }
}

fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("segment-{generation:010}.log"))
}

fn create_file(path: &Path) -> Result<File, OutboxError> {
    OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io_error(path))
}

/// Makes file creations, renames and deletions in `dir` survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

/// The segment files in `dir`, oldest generation first.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, OutboxError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let generation = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("segment-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(generation) = generation {
            segments.push((generation, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(body.len() + HEADER_BYTES as usize);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    record.extend_from_slice(body);
    record
}

/// The whole records of a file, in order, up to the first one that is cut short or does not
/// match its checksum (reported, with how much is skipped).
fn read_records(path: &Path) -> Result<Vec<Vec<u8>>, OutboxError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(OutboxError::Io { path: path.to_owned(), source }),
    };
    let total = file.metadata().map_err(io_error(path))?.len();
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    while offset < total {
        let mut header = [0u8; HEADER_BYTES as usize];
        let body = if total - offset < HEADER_BYTES {
            None
        } else {
            reader.read_exact(&mut header).map_err(io_error(path))?;
            let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if length > MAX_RECORD_BYTES || u64::from(length) > total - offset - HEADER_BYTES {
                None
            } else {
                let mut body = vec![0u8; length as usize];
                reader.read_exact(&mut body).map_err(io_error(path))?;
                (crc32fast::hash(&body) == checksum).then_some(body)
            }
        };
        let Some(body) = body else {
            warn!(
                "outbox file {} is damaged at byte {offset} (a write cut short by a crash or power cut): \
                 keeping the {} records before it, skipping the last {} bytes",
                path.display(),
                records.len(),
                total - offset
            );
            break;
        };
        offset += HEADER_BYTES + body.len() as u64;
        records.push(body);
    }
    Ok(records)
}

fn read_segment(path: &Path) -> Result<Vec<StoredMessage>, OutboxError> {
    let mut messages = Vec::new();
    for body in read_records(path)? {
        match serde_json::from_slice(&body) {
            Ok(message) => messages.push(message),
            // The checksum matched, so this was written as it is: by another version, perhaps.
            Err(e) => warn!("outbox file {}: skipping a record that is not a message: {e}", path.display()),
        }
    }
    Ok(messages)
}

fn read_ack_log(path: &Path) -> Result<BTreeSet<u64>, OutboxError> {
    Ok(read_records(path)?
        .into_iter()
        .filter_map(|body| <[u8; 8]>::try_from(body.as_slice()).ok().map(u64::from_le_bytes))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(outbox: &mut Outbox, payload: &str, priority: Priority) -> (u64, Vec<u64>) {
        let (message, dropped) = outbox.append("outpost/t/alert", payload, priority, SystemTime::now()).unwrap();
        (message.seq, dropped)
    }

    fn payloads(messages: &[StoredMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.payload.as_str()).collect()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn unacknowledged_messages_come_back_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, held) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert!(held.is_empty());
        for n in 0..5 {
            append(&mut outbox, &format!("m{n}"), PRIORITY_ACTION);
        }
        outbox.acknowledge(1).unwrap();
        outbox.acknowledge(3).unwrap();
        drop(outbox);

        let (mut outbox, held) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&held), ["m0", "m2", "m4"]);
        assert_eq!(held.iter().map(|m| m.seq).collect::<Vec<_>>(), [0, 2, 4]);
        // New messages follow the held ones.
        assert_eq!(append(&mut outbox, "m5", PRIORITY_ACTION).0, 5);
        for seq in [0, 2, 4, 5] {
            outbox.acknowledge(seq).unwrap();
        }
        assert!(outbox.is_empty());
        drop(outbox);
        let (_, held) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert!(held.is_empty());
    }

    #[test]
    fn a_second_daemon_cannot_open_the_same_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Outbox::open(dir.path(), 1 << 20).unwrap();
        let Err(error) = Outbox::open(dir.path(), 1 << 20) else { panic!("opened twice") };
        assert!(matches!(error, OutboxError::InUse { .. }), "{error}");
        assert!(error.to_string().contains("in use by another outpostd"), "{error}");
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_every_record_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        for n in 0..3 {
            append(&mut outbox, &format!("m{n}"), PRIORITY_ACTION);
        }
        drop(outbox);
        let segment = segment_path(dir.path(), 0);
        // A write cut short: half a record at the end.
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        let torn = frame(br#"{"seq":3,"topic":"t","payload":"m3","priority":5,"created_ms":0}"#);
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);

        let (mut outbox, held) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&held), ["m0", "m1", "m2"]);
        assert_eq!(append(&mut outbox, "m3", PRIORITY_ACTION).0, 3);
    }

    #[test]
    fn a_garbled_record_ends_its_segment_but_not_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        // Two records to a segment.
        let (mut outbox, _) = Outbox::open_with_segment_bytes(dir.path(), 1 << 20, 300).unwrap();
        for n in 0..6 {
            append(&mut outbox, &format!("message {n} with some words to fill the segment"), PRIORITY_ACTION);
        }
        drop(outbox);
        let segments = segment_files(dir.path()).unwrap();
        assert!(segments.len() >= 3, "{segments:?}");
        // Flip a byte in the first segment's second record.
        let first = &segments[0].1;
        let mut bytes = fs::read(first).unwrap();
        let first_record = HEADER_BYTES as usize + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[first_record + 12] ^= 0xff;
        fs::write(first, bytes).unwrap();

        let (_, held) = Outbox::open(dir.path(), 1 << 20).unwrap();
        let seqs: Vec<u64> = held.iter().map(|m| m.seq).collect();
        assert_eq!(seqs[0], 0);
        assert!(!seqs.contains(&1), "the garbled record is skipped: {seqs:?}");
        assert!(seqs.contains(&5), "later segments are kept: {seqs:?}");
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_the_directory_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open_with_segment_bytes(dir.path(), 1 << 20, 300).unwrap();
        for n in 0..40 {
            let (seq, _) = append(&mut outbox, &format!("message number {n} and some padding"), PRIORITY_EVENT);
            outbox.acknowledge(seq).unwrap();
        }
        let names = files(dir.path());
        let segments = names.iter().filter(|n| n.starts_with("segment-")).count();
        assert_eq!(segments, 1, "only the active segment is left: {names:?}");
        assert_eq!(outbox.bytes(), 0);
    }

    #[test]
    fn over_the_cap_the_oldest_lowest_priority_message_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        let size = {
            let (seq, _) = append(&mut outbox, "probe", PRIORITY_EVENT);
            let size = outbox.bytes();
            outbox.acknowledge(seq).unwrap();
            size
        };
        drop(outbox);
        // Room for four messages of this size.
        let (mut outbox, _) = Outbox::open(dir.path(), size * 4 + size / 2).unwrap();
        let alert = append(&mut outbox, "alert", PRIORITY_ACTION).0;
        let event_a = append(&mut outbox, "evt_a", PRIORITY_EVENT).0;
        let report = append(&mut outbox, "rep_3", PRIORITY_REPORT + 3).0;
        let event_b = append(&mut outbox, "evt_b", PRIORITY_EVENT).0;
        let (_, dropped) = append(&mut outbox, "rep_1", PRIORITY_REPORT + 1);
        assert_eq!(dropped, [event_a]);
        let (_, dropped) = append(&mut outbox, "alrt2", PRIORITY_ACTION);
        assert_eq!(dropped, [event_b]);
        let rep_1 = event_b + 1;
        let (_, dropped) = append(&mut outbox, "alrt3", PRIORITY_ACTION);
        assert_eq!(dropped, [rep_1], "the less severe report goes before the more severe one");
        assert_eq!(outbox.dropped(), 3);
        drop(outbox);
        let (_, held) = Outbox::open(dir.path(), size * 4 + size / 2).unwrap();
        assert_eq!(held.iter().map(|m| m.seq).collect::<Vec<_>>(), [alert, report, event_b + 2, event_b + 3]);
    }

    #[test]
    fn a_message_larger_than_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), 100).unwrap();
        let error = outbox.append("t", &"x".repeat(200), PRIORITY_ACTION, SystemTime::now()).unwrap_err();
        assert!(matches!(error, OutboxError::TooLarge { .. }), "{error}");
    }

    #[test]
    fn the_outbox_is_compacted_when_acknowledgements_pile_up_behind_a_stuck_message() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), 64 << 20).unwrap();
        let kept = append(&mut outbox, "kept", PRIORITY_ACTION).0;
        for _ in 0..(ACK_LOG_COMPACT_BYTES / 16 + 10) {
            let (seq, _) = append(&mut outbox, "gone", PRIORITY_EVENT);
            outbox.acknowledge(seq).unwrap();
        }
        let ack_log = fs::metadata(dir.path().join("acked.log")).unwrap().len();
        assert!(ack_log <= ACK_LOG_COMPACT_BYTES, "{ack_log}");
        let segments: u64 =
            segment_files(dir.path()).unwrap().iter().map(|(_, path)| fs::metadata(path).unwrap().len()).sum();
        assert!(segments < 1 << 20, "acknowledged messages were dropped from disk: {segments} bytes left");
        drop(outbox);
        let (_, held) = Outbox::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(held.iter().map(|m| m.seq).collect::<Vec<_>>(), [kept]);
    }
}
