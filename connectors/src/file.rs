//! The `file` connector: JSON lines or CSV from a local file, bounded or followed as it grows.
//!
//! ```sql
//! CREATE SOURCE readings (device TEXT, temp DOUBLE PRECISION, ts TIMESTAMP(3),
//!                         WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
//!   WITH (connector = 'file', path = '/var/log/readings.jsonl', follow = 'true')
//!   FORMAT PLAIN ENCODE JSON;
//! ```
//!
//! Options: `path` (required), `follow` (`false` by default: the source ends at the end of the file, closing every
//! window; `true`: it waits for more lines, polling every `poll.interval.ms`, default 100), `batch.rows` (lines per
//! batch, default 4096), `decode.parallelism` (how many threads decode batches, default the number of cores, at
//! most 4). Only whole lines are read; in follow mode a line still being written is read once its newline arrives.
//! Lines that do not decode are set aside with their line number (see [`crate::format`]).
//!
//! A thread of the source's own reads the file ahead of the view, so a cold page cache or a slow disk never stalls
//! the view's operators. It cuts the file into batches of whole lines; with `decode.parallelism` above 1, the batches
//! are decoded by that many threads side by side, and handed out in the order of the file all the same (each batch
//! waits for the ones before it), so rows, line numbers, positions and watermarks are exactly those of one thread.
//! At most two batches a decoding thread (and two more) are read ahead. The position only moves when a batch is
//! handed out, and a cancelled `next_batch` loses nothing (the batch, or the decoding it waits for, stays with the
//! source). `FLUSH` waits for the thread to reach the end of the file as it was (see [`SourceReader::ready_batch`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, oneshot};
use weir_common::connector::{
    ConnectorError, Encoding, Options, Rejected, SourceReader, SourceStats, decode_position, encode_position,
};

use crate::format::RecordDecoder;

const OPTIONS: &[&str] =
    &["connector", "path", "follow", "poll.interval.ms", "batch.rows", "max.record.bytes", "decode.parallelism"];

/// The longest line read as a record unless `max.record.bytes` says otherwise; a longer one is set aside.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// A source reading one file. A thread of its own ([`FileReader`]) reads ahead, and it or its decoding threads
/// decode, so the view's operators never wait on the disk.
#[derive(Debug)]
pub struct FileSource {
    config: FileConfig,
    /// Where the reading thread starts (until it starts, or after a seek).
    start: Option<Box<FileReader>>,
    /// What the reading thread has read, in the file's order, once it runs.
    chunks: Option<mpsc::Receiver<Pending>>,
    /// The batch taken from `chunks` whose decoding has not ended yet: the next to hand out.
    decoding: Option<oneshot::Receiver<Chunk>>,
    /// The byte offset after the last whole line handed out, and that line's number.
    position: (u64, u64),
    rejected: Vec<Rejected>,
    /// Bytes of the records handed out.
    bytes: u64,
    ended: bool,
    /// Set by the reading thread while it is at the end of the file, everything before sent.
    at_end: Arc<AtomicBool>,
}

/// Batches read ahead of the view, besides those the decoding threads work on.
const CHUNKS_AHEAD: usize = 2;

/// The reading thread's buffer: a read of the file fills it, and the whole lines in it are taken with one copy.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// What the source was created with.
#[derive(Debug, Clone)]
struct FileConfig {
    path: String,
    follow: bool,
    poll: Duration,
    batch_rows: usize,
    max_record: usize,
    schema: SchemaRef,
    encoding: Encoding,
    /// Threads decoding batches (1: the reading thread decodes them itself).
    decoders: usize,
}

/// What the reading thread hands over: a batch of lines (rows, the lines set aside, the position after them), the
/// end of a file not followed, or why it stopped.
#[derive(Debug)]
enum Chunk {
    Rows { batch: Option<RecordBatch>, rejected: Vec<Rejected>, bytes: u64, position: (u64, u64) },
    End,
    Failed(ConnectorError),
}

/// What the reading thread sends the source, in the file's order: a chunk, or a batch a decoding thread works on.
#[derive(Debug)]
enum Pending {
    Ready(Chunk),
    Decoding(oneshot::Receiver<Chunk>),
}

/// A batch of lines for a decoding thread, and where its chunk goes.
struct Job {
    lines: Lines,
    rejected: Vec<Rejected>,
    position: (u64, u64),
    done: oneshot::Sender<Chunk>,
}

/// A batch of lines read: their bytes one after the other, and each line's span and number.
struct Lines {
    buffer: Vec<u8>,
    spans: Vec<(usize, usize, u64)>,
}

/// Reads one file in batches of whole lines, on the source's reading thread.
#[derive(Debug)]
struct FileReader {
    config: FileConfig,
    decoder: Arc<RecordDecoder>,
    skip_header: bool,
    reader: BufReader<File>,
    /// Lines read so far (for the origin of rejected records).
    line: u64,
    /// The start of a line whose newline has not arrived yet (follow mode), at most `max_record + 1` bytes of it.
    partial: Vec<u8>,
    /// How long that line is so far, all of it.
    partial_len: usize,
    /// Bytes of the file consumed so far (the partial line's included).
    offset: u64,
    /// Whether the thread is at the end of the file with every line before it sent (see [`FileSource::at_end`]).
    at_end: Arc<AtomicBool>,
}

impl FileSource {
    pub fn try_new(
        schema: SchemaRef,
        mut options: Options,
        encoding: Option<Encoding>,
    ) -> Result<Self, ConnectorError> {
        let path = options
            .take("path")
            .ok_or_else(|| ConnectorError::MissingOption { connector: "file".into(), key: "path".into() })?;
        let follow = options.take_parsed::<bool>("follow", "true or false")?.unwrap_or(false);
        let poll =
            Duration::from_millis(options.take_parsed::<u64>("poll.interval.ms", "milliseconds")?.unwrap_or(100));
        let batch_rows =
            options.take_parsed::<usize>("batch.rows", "a number of rows")?.unwrap_or(4096).clamp(1, 1 << 20);
        let max_record =
            options.take_parsed::<usize>("max.record.bytes", "a number of bytes")?.unwrap_or(DEFAULT_MAX_RECORD_BYTES);
        let decoders = crate::format::take_decode_parallelism(&mut options)?;
        options.finish("file", OPTIONS)?;
        let encoding = encoding
            .filter(|e| !matches!(e, Encoding::Avro { .. }))
            .ok_or_else(|| ConnectorError::Format { connector: "file".into(), expected: "JSON or CSV".into() })?;
        let config = FileConfig { path, follow, poll, batch_rows, max_record, schema, encoding, decoders };
        let reader = FileReader::open(config.clone())?;
        Ok(FileSource {
            config,
            start: Some(Box::new(reader)),
            chunks: None,
            decoding: None,
            position: (0, 0),
            rejected: Vec::new(),
            bytes: 0,
            ended: false,
            at_end: Arc::default(),
        })
    }

    /// The reading thread's batches, starting it on the first call.
    fn chunks(&mut self) -> Result<&mut mpsc::Receiver<Pending>, ConnectorError> {
        if self.chunks.is_none() {
            let reader = match self.start.take() {
                Some(reader) => reader,
                None => Box::new(FileReader::open(self.config.clone())?),
            };
            let ahead = match self.config.decoders {
                1 => CHUNKS_AHEAD,
                decoders => CHUNKS_AHEAD * (decoders + 1),
            };
            let (sender, chunks) = mpsc::channel(ahead);
            let mut reader = reader;
            self.at_end = Arc::new(AtomicBool::new(false));
            reader.at_end = self.at_end.clone();
            std::thread::Builder::new()
                .name("weir-file-reader".to_string())
                .spawn(move || reader.run(&sender))
                .map_err(|e| {
                    ConnectorError::Io(format!("could not start reading file \"{}\": {e}", self.config.path))
                })?;
            self.chunks = Some(chunks);
        }
        self.chunks.as_mut().ok_or_else(|| ConnectorError::Io("the file reader did not start".to_string()))
    }
}

impl FileSource {
    /// What a chunk from the reading thread makes of the next batch: `None` when it had none (only lines set aside).
    fn take(&mut self, chunk: Option<Chunk>) -> Option<Result<Option<RecordBatch>, ConnectorError>> {
        match chunk {
            Some(Chunk::Rows { batch, rejected, bytes, position }) => {
                self.rejected.extend(rejected);
                self.bytes += bytes;
                self.position = position;
                batch.map(|batch| Ok(Some(batch)))
            }
            Some(Chunk::End) => {
                self.ended = true;
                Some(Ok(None))
            }
            Some(Chunk::Failed(err)) => {
                self.chunks = None;
                Some(Err(err))
            }
            None => {
                self.chunks = None;
                Some(Err(ConnectorError::Io(format!("the reader of file \"{}\" stopped", self.config.path))))
            }
        }
    }
}

impl FileReader {
    fn open(config: FileConfig) -> Result<Self, ConnectorError> {
        let skip_header = matches!(config.encoding, Encoding::Csv { header: true, .. });
        let decoder = Arc::new(RecordDecoder::try_new(config.schema.clone(), config.encoding.clone())?);
        let path = &config.path;
        let file = File::open(path).map_err(|e| ConnectorError::Io(format!("could not open file \"{path}\": {e}")))?;
        Ok(FileReader {
            config,
            decoder,
            skip_header,
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            line: 0,
            partial: Vec::new(),
            partial_len: 0,
            offset: 0,
            at_end: Arc::default(),
        })
    }

    /// Reads batches until the file ends (not followed), a read fails, or the source is gone, and decodes them
    /// itself or hands them to its decoding threads; waits when the source has [`CHUNKS_AHEAD`] batches waiting
    /// besides those being decoded.
    fn run(mut self: Box<Self>, chunks: &mpsc::Sender<Pending>) {
        let decoders = match self.config.decoders {
            1 => None,
            threads => match self.start_decoders(threads) {
                Ok(jobs) => Some(jobs),
                Err(err) => {
                    let _ = chunks.blocking_send(Pending::Ready(Chunk::Failed(err)));
                    return;
                }
            },
        };
        loop {
            self.at_end.store(false, Ordering::Release);
            let mut rejected = Vec::new();
            let lines = match self.read_lines(&mut rejected) {
                Ok(lines) => lines,
                Err(err) => {
                    let _ = chunks.blocking_send(Pending::Ready(Chunk::Failed(err)));
                    return;
                }
            };
            let position = (self.offset - self.partial_len as u64, self.line);
            if lines.spans.is_empty() && rejected.is_empty() {
                self.at_end.store(true, Ordering::Release);
                if !self.config.follow {
                    let _ = chunks.blocking_send(Pending::Ready(Chunk::End));
                    return;
                }
                if chunks.is_closed() {
                    return;
                }
                std::thread::sleep(self.config.poll);
                continue;
            }
            let sent = match &decoders {
                None => chunks.blocking_send(Pending::Ready(decode(
                    &self.decoder,
                    &self.config.path,
                    lines,
                    rejected,
                    position,
                ))),
                Some(jobs) => {
                    // The place in the file's order first, then the work: the source waits on the first.
                    let (done, decoding) = oneshot::channel();
                    chunks.blocking_send(Pending::Decoding(decoding)).map(|()| {
                        // Decoding threads only stop once `jobs` is dropped: a failed send leaves the source waiting
                        // on `decoding`, which then reports the reader stopped.
                        let _ = jobs.send(Job { lines, rejected, position, done });
                    })
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// Starts `threads` decoding threads, taking batches from the returned queue until it is dropped.
    fn start_decoders(&self, threads: usize) -> Result<std::sync::mpsc::SyncSender<Job>, ConnectorError> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..threads {
            let (queue, decoder, path) = (queue.clone(), self.decoder.clone(), self.config.path.clone());
            std::thread::Builder::new()
                .name("weir-file-decoder".to_string())
                .spawn(move || {
                    loop {
                        // The lock is held while waiting for a job only, never while decoding.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(Job { lines, rejected, position, done }) = job else { return };
                        // The source may be gone (cancelled, sought elsewhere): its chunk is then nobody's.
                        let _ = done.send(decode(&decoder, &path, lines, rejected, position));
                    }
                })
                .map_err(|e| {
                    ConnectorError::Io(format!("could not start decoding file \"{}\": {e}", self.config.path))
                })?;
        }
        Ok(jobs)
    }

    /// Reads up to `batch_rows` whole lines, one after the other into one buffer (no allocation per line); fewer
    /// (maybe none) at the end of the file. Lines too long are set aside in `rejected`.
    fn read_lines(&mut self, rejected: &mut Vec<Rejected>) -> Result<Lines, ConnectorError> {
        // A line begun in the last call (follow mode) starts the buffer.
        let mut lines = Lines { buffer: std::mem::take(&mut self.partial), spans: Vec::new() };
        let max_record = self.config.max_record;
        let mut start = 0;
        while lines.spans.len() < self.config.batch_rows {
            if self.partial_len == 0 && !(self.line == 0 && self.skip_header) {
                let taken = self.take_whole_lines(&mut lines, start)?;
                if taken > 0 {
                    start += taken;
                    continue;
                }
            }
            let mut len = std::mem::take(&mut self.partial_len);
            let before = len;
            let complete = read_line(&mut self.reader, &mut lines.buffer, &mut len, start + max_record + 1)
                .map_err(|e| ConnectorError::Io(format!("could not read file \"{}\": {e}", self.config.path)))?;
            self.offset += (len - before) as u64;
            if len == 0 {
                break;
            }
            if !complete && self.config.follow {
                // The rest of this line has not been written yet.
                self.partial = lines.buffer.split_off(start);
                self.partial_len = len;
                break;
            }
            self.line += 1;
            let end = lines.buffer.len();
            if self.line == 1 && self.skip_header {
                lines.buffer.truncate(start);
                continue;
            }
            let record_len = len - usize::from(complete);
            if record_len > max_record {
                let origin = format!("{}:{}", self.config.path, self.line);
                let error = format!("the line is {record_len} bytes long, more than max.record.bytes ({max_record})");
                let kept = &lines.buffer[start..end.min(start + weir_common::connector::DEAD_LETTER_PREFIX_BYTES)];
                rejected.push(Rejected::new(origin, kept, error));
                lines.buffer.truncate(start);
                if !complete {
                    break;
                }
                continue;
            }
            lines.spans.push((start, end, self.line));
            start = end;
            if !complete {
                break;
            }
        }
        Ok(lines)
    }

    /// Takes the whole lines that lie in the reader's buffer, none longer than `max.record.bytes`, up to the batch's
    /// number, with one copy (instead of one a line); how many bytes. Zero when the buffer's first line is not whole
    /// (it goes over the buffer's end, or is too long) or the file is at its end: [`read_line`] then takes it.
    fn take_whole_lines(&mut self, lines: &mut Lines, start: usize) -> Result<usize, ConnectorError> {
        let available = (self.reader.fill_buf())
            .map_err(|e| ConnectorError::Io(format!("could not read file \"{}\": {e}", self.config.path)))?;
        let mut taken = 0;
        for at in memchr::memchr_iter(b'\n', available) {
            if lines.spans.len() == self.config.batch_rows || at - taken > self.config.max_record {
                break;
            }
            self.line += 1;
            lines.spans.push((start + taken, start + at + 1, self.line));
            taken = at + 1;
        }
        lines.buffer.extend_from_slice(&available[..taken]);
        self.reader.consume(taken);
        self.offset += taken as u64;
        Ok(taken)
    }

    /// Moves to byte `offset`, the start of line `line + 1`.
    fn seek(&mut self, offset: u64, line: u64) -> Result<(), ConnectorError> {
        use std::io::Seek;
        self.reader.seek(std::io::SeekFrom::Start(offset)).map_err(|e| {
            ConnectorError::Io(format!("could not resume file \"{}\" at byte {offset}: {e}", self.config.path))
        })?;
        (self.offset, self.line, self.partial, self.partial_len) = (offset, line, Vec::new(), 0);
        Ok(())
    }
}

/// Reads on to the end of the current line, appending to `line` at most up to `keep` bytes of it and counting all
/// of them in `len`; whether the newline was reached. A line without end costs no more memory than `keep`.
fn read_line(reader: &mut BufReader<File>, line: &mut Vec<u8>, len: &mut usize, keep: usize) -> std::io::Result<bool> {
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(false);
        }
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(at) => (&available[..=at], true),
            None => (available, false),
        };
        let room = keep.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let taken = chunk.len();
        *len += taken;
        reader.consume(taken);
        if done {
            return Ok(true);
        }
    }
}

/// Decodes a batch of lines read from the file at `path` into the chunk the source hands out.
fn decode(
    decoder: &RecordDecoder,
    path: &str,
    lines: Lines,
    mut rejected: Vec<Rejected>,
    position: (u64, u64),
) -> Chunk {
    let payloads: Vec<&[u8]> = lines.spans.iter().map(|(start, end, _)| &lines.buffer[*start..*end]).collect();
    let bytes = payloads.iter().map(|p| p.len() as u64).sum::<u64>();
    // The lines lie one after the other: the decoder takes them as one input.
    let block = match (lines.spans.first(), lines.spans.last()) {
        (Some((start, _, _)), Some((_, end, _))) => &lines.buffer[*start..*end],
        _ => &[],
    };
    let (batch, undecoded, _) = decoder.decode_lines(block, &payloads, |i| format!("{path}:{}", lines.spans[i].2));
    rejected.extend(undecoded);
    Chunk::Rows { batch, rejected, bytes, position }
}

#[async_trait]
impl SourceReader for FileSource {
    fn schema(&self) -> SchemaRef {
        self.config.schema.clone()
    }

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            // Both waits are cancel-safe: a batch not taken stays in the channel, and one taken whose decoding has
            // not ended stays in `decoding`.
            let chunk = match self.decoding.as_mut() {
                Some(decoding) => {
                    let chunk = decoding.await.ok();
                    self.decoding = None;
                    chunk
                }
                None => match self.chunks()?.recv().await {
                    Some(Pending::Ready(chunk)) => Some(chunk),
                    Some(Pending::Decoding(decoding)) => {
                        self.decoding = Some(decoding);
                        continue;
                    }
                    None => None,
                },
            };
            if let Some(result) = self.take(chunk) {
                return result;
            }
        }
    }

    /// Waits for the reading thread to reach the end of the file as it is now, and for what it read to be decoded:
    /// the rows there are ready.
    async fn ready_batch(&mut self) -> Option<Result<Option<RecordBatch>, ConnectorError>> {
        loop {
            if self.ended {
                return Some(Ok(None));
            }
            if let Some(decoding) = self.decoding.as_mut() {
                // A batch read is decoded soon, whatever the file does.
                let chunk = match decoding.try_recv() {
                    Ok(chunk) => Some(chunk),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => None,
                };
                self.decoding = None;
                match self.take(chunk) {
                    Some(result) => return Some(result),
                    None => continue,
                }
            }
            // Read before looking: at the end, everything the thread read is in the channel already.
            let at_end = self.at_end.load(Ordering::Acquire);
            let chunk = match self.chunks() {
                Ok(chunks) => chunks.try_recv(),
                Err(err) => return Some(Err(err)),
            };
            match chunk {
                Ok(Pending::Ready(chunk)) => {
                    if let Some(result) = self.take(Some(chunk)) {
                        return Some(result);
                    }
                }
                Ok(Pending::Decoding(decoding)) => self.decoding = Some(decoding),
                Err(mpsc::error::TryRecvError::Empty) if at_end => return None,
                Err(mpsc::error::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(mpsc::error::TryRecvError::Disconnected) => return self.take(None),
            }
        }
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    fn stats(&self) -> SourceStats {
        SourceStats { bytes: Some(self.bytes), ..SourceStats::default() }
    }

    /// The byte offset after the last whole line handed out, and that line's number.
    fn position(&self) -> Option<Vec<u8>> {
        Some(encode_position(&[self.position.0 as i64, self.position.1 as i64]))
    }

    /// Resumes after a position: the reading thread (if it ran) stops, and a new one starts there.
    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let numbers = decode_position(position, Some(2), &format!("file \"{}\"", self.config.path))?;
        let (offset, line) = (numbers[0].max(0) as u64, numbers[1].max(0) as u64);
        let mut reader = match self.start.take() {
            Some(reader) => reader,
            None => Box::new(FileReader::open(self.config.clone())?),
        };
        reader.seek(offset, line)?;
        (self.start, self.chunks, self.decoding, self.position, self.ended) =
            (Some(reader), None, None, (offset, line), false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use futures::FutureExt;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("name", DataType::Utf8, true)]))
    }

    fn open(path: &std::path::Path, follow: bool, encoding: Encoding) -> FileSource {
        let options = Options::new([
            ("path".to_string(), path.display().to_string()),
            ("follow".to_string(), follow.to_string()),
            ("poll.interval.ms".to_string(), "5".to_string()),
        ])
        .unwrap();
        FileSource::try_new(schema(), options, Some(encoding)).unwrap()
    }

    #[tokio::test]
    async fn a_bounded_csv_file_skips_its_header_and_ends() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "id,name\n1,a\nx,b\n3,c").unwrap();
        let mut source = open(file.path(), false, Encoding::Csv { delimiter: b',', header: true });
        let batch = source.next_batch().await.unwrap().unwrap();
        assert_eq!(batch.num_rows(), 2, "the last line needs no newline when the file is not followed");
        assert_eq!(source.next_batch().await.unwrap(), None);
        let rejected = source.take_rejected();
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].origin.ends_with(":3"), "{}", rejected[0].origin);
    }

    #[tokio::test]
    async fn a_followed_file_is_read_as_whole_lines_arrive() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "{{\"id\": 1}}\n{{\"id\": 2, \"na").unwrap();
        file.flush().unwrap();
        let mut source = open(file.path(), true, Encoding::Json);
        assert_eq!(source.next_batch().await.unwrap().unwrap().num_rows(), 1);
        // The second line is incomplete: nothing to read yet.
        assert!(source.next_batch().now_or_never().is_none());
        writeln!(file, "me\": \"b\"}}").unwrap();
        file.flush().unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(5), source.next_batch()).await.unwrap().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert!(source.take_rejected().is_empty());
    }

    #[tokio::test]
    async fn a_line_longer_than_the_bound_is_set_aside_with_its_length() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let long = "x".repeat(10_000);
        write!(file, "{{\"id\": 1}}\n{{\"name\": \"{long}\"}}\n{{\"id\": 3}}\n").unwrap();
        let options = Options::new([
            ("path".to_string(), file.path().display().to_string()),
            ("max.record.bytes".to_string(), "100".to_string()),
        ])
        .unwrap();
        let mut source = FileSource::try_new(schema(), options, Some(Encoding::Json)).unwrap();
        let batch = source.next_batch().await.unwrap().unwrap();
        assert_eq!(batch.num_rows(), 2, "the lines around the long one are read");
        let rejected = source.take_rejected();
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].origin.ends_with(":2"));
        assert_eq!(rejected[0].error, "the line is 10012 bytes long, more than max.record.bytes (100)");
        assert!(rejected[0].record.len() <= 101, "only a prefix is kept");
    }

    #[tokio::test]
    async fn batches_are_read_and_decoded_ahead_of_the_view() {
        // Three lines longer than the read buffer, one batch each.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let name = "x".repeat(READ_BUFFER_BYTES + 5_000);
        for id in 1..=3 {
            writeln!(file, "{{\"id\": {id}, \"name\": \"{name}\"}}").unwrap();
        }
        file.flush().unwrap();
        let options = Options::new([
            ("path".to_string(), file.path().display().to_string()),
            ("batch.rows".to_string(), "1".to_string()),
        ])
        .unwrap();
        let mut source = FileSource::try_new(schema(), options, Some(Encoding::Json)).unwrap();
        assert_eq!(source.next_batch().await.unwrap().unwrap().num_rows(), 1);
        let after_first = source.position().unwrap();
        // The reading thread fills its two batches ahead while the view does not ask; the position still says what
        // was handed out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(source.position().unwrap(), after_first);
        // Cut the file: what was read ahead still comes, whole and decoded (reading now would find nothing).
        file.as_file().set_len(0).unwrap();
        for _ in 2..=3 {
            let batch = source.next_batch().await.unwrap().unwrap();
            assert_eq!(
                batch.column(1).as_any().downcast_ref::<datafusion::arrow::array::StringArray>().unwrap().value(0),
                name
            );
        }
        assert_eq!(source.next_batch().await.unwrap(), None);
        assert!(source.take_rejected().is_empty());
    }

    /// Every batch of a file with bad and long lines (a batch of 7 lines each), with its rejected lines and the
    /// position after it, as `threads` decoding threads hand them out.
    async fn read_all(path: &std::path::Path, threads: &str) -> Vec<(Vec<i64>, Vec<String>, Vec<u8>)> {
        let options = Options::new([
            ("path".to_string(), path.display().to_string()),
            ("batch.rows".to_string(), "7".to_string()),
            ("max.record.bytes".to_string(), "40".to_string()),
            ("decode.parallelism".to_string(), threads.to_string()),
        ])
        .unwrap();
        let mut source =
            FileSource::try_new(schema(), options, Some(Encoding::Csv { delimiter: b',', header: true })).unwrap();
        let mut batches = Vec::new();
        while let Some(batch) = source.next_batch().await.unwrap() {
            let ids = batch.column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap();
            let rejected = source.take_rejected().into_iter().map(|r| r.origin).collect();
            batches.push((ids.values().to_vec(), rejected, source.position().unwrap()));
        }
        // Lines set aside after the last batch with rows.
        batches.push((Vec::new(), source.take_rejected().into_iter().map(|r| r.origin).collect(), Vec::new()));
        batches
    }

    #[tokio::test]
    async fn decoding_threads_hand_out_what_one_thread_does_in_the_files_order() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "id,name").unwrap();
        // Line n + 1 holds id n; every 13th id is not a number, every 29th line is too long.
        for id in 1..=1_000 {
            match id {
                _ if id % 13 == 0 => writeln!(file, "bad{id},x").unwrap(),
                _ if id % 29 == 0 => writeln!(file, "{id},{}", "y".repeat(50)).unwrap(),
                _ => writeln!(file, "{id},n{id}").unwrap(),
            }
        }
        file.flush().unwrap();
        let one = read_all(file.path(), "1").await;
        let three = read_all(file.path(), "3").await;
        assert_eq!(three, one);
        let ids: Vec<i64> = three.iter().flat_map(|(ids, _, _)| ids.clone()).collect();
        let expected: Vec<i64> = (1..=1_000).filter(|id| id % 13 != 0 && id % 29 != 0).collect();
        assert_eq!(ids, expected, "every good line once, in the file's order");
        // Within a batch, lines too long are set aside as they are read, before those that do not decode.
        let mut rejected: Vec<u64> = three
            .iter()
            .flat_map(|(_, rejected, _)| {
                rejected.iter().map(|origin| origin.rsplit(':').next().unwrap().parse().unwrap())
            })
            .collect();
        rejected.sort_unstable();
        let lines: Vec<u64> = (1..=1_000).filter(|id| id % 13 == 0 || id % 29 == 0).map(|id| id + 1).collect();
        assert_eq!(rejected, lines, "bad lines set aside with their line numbers");
        // A batch is 7 lines not too long (a line too long is set aside as it is read, and not counted); the position
        // after it is its last line's.
        let last_lines: Vec<i64> = three[..three.len() - 1]
            .iter()
            .map(|(_, _, position)| decode_position(position, Some(2), "test").unwrap()[1])
            .collect();
        let not_long: Vec<i64> = (1..=1_000).filter(|id| id % 13 == 0 || id % 29 != 0).map(|id| id + 1).collect();
        let expected: Vec<i64> = not_long.chunks(7).map(|batch| batch[batch.len() - 1]).collect();
        assert_eq!(last_lines, expected);
    }

    #[tokio::test]
    async fn lines_across_the_read_buffer_s_end_are_read_whole_and_numbered() {
        // About 2.9 MB of lines of 4 to 104 bytes (eleven read buffers): lines go over a buffer's end, and those
        // longer than 100 bytes are set aside.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let line = |id: usize| format!("{id},{}", "y".repeat(id % 97 + 2));
        for id in 1..=50_000 {
            writeln!(file, "{}", line(id)).unwrap();
        }
        file.flush().unwrap();
        let options = Options::new([
            ("path".to_string(), file.path().display().to_string()),
            ("max.record.bytes".to_string(), "100".to_string()),
        ])
        .unwrap();
        let mut source =
            FileSource::try_new(schema(), options, Some(Encoding::Csv { delimiter: b',', header: false })).unwrap();
        let (mut ids, mut names, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(batch) = source.next_batch().await.unwrap() {
            ids.extend(batch.column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap());
            let column = batch.column(1).as_any().downcast_ref::<datafusion::arrow::array::StringArray>().unwrap();
            names.extend(column.iter().map(|name| name.map(str::len)));
            rejected.extend(source.take_rejected().into_iter().map(|r| r.origin));
        }
        rejected.extend(source.take_rejected().into_iter().map(|r| r.origin));
        let long = |id: &usize| line(*id).len() > 100;
        let expected: Vec<usize> = (1..=50_000).filter(|id| !long(id)).collect();
        assert_eq!(ids, expected.iter().map(|id| Some(*id as i64)).collect::<Vec<_>>());
        assert_eq!(names, expected.iter().map(|id| Some(id % 97 + 2)).collect::<Vec<_>>());
        let origins: Vec<String> =
            (1..=50_000).filter(long).map(|id| format!("{}:{id}", file.path().display())).collect();
        assert_eq!(rejected, origins);
        // Line 50,000 is not long: the position after it is the file's end.
        let end = file.as_file().metadata().unwrap().len() as i64;
        assert_eq!(source.position().unwrap(), encode_position(&[end, 50_000]));
    }

    #[test]
    fn decode_parallelism_is_a_number_of_threads() {
        for bad in ["0", "65", "many"] {
            let options = Options::new([
                ("path".to_string(), "/tmp".to_string()),
                ("decode.parallelism".to_string(), bad.into()),
            ])
            .unwrap();
            let err = FileSource::try_new(schema(), options, Some(Encoding::Json)).unwrap_err();
            assert!(err.to_string().contains("decode.parallelism"), "{err}");
        }
    }

    #[test]
    fn a_missing_file_and_a_missing_format_are_errors() {
        let options = Options::new([("path".to_string(), "/nonexistent/weir.json".to_string())]).unwrap();
        let err = FileSource::try_new(schema(), options, Some(Encoding::Json)).unwrap_err();
        assert!(err.to_string().starts_with("could not open file \"/nonexistent/weir.json\""), "{err}");
        let options = Options::new([("path".to_string(), "/tmp".to_string())]).unwrap();
        let err = FileSource::try_new(schema(), options, None).unwrap_err();
        assert_eq!(err.to_string(), "connector \"file\" needs FORMAT PLAIN ENCODE JSON or CSV");
    }

    #[tokio::test]
    async fn a_reader_resumes_after_the_last_line_handed_out() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "id,name\n1,a\n2,b\n3,").unwrap();
        let open_one_row = |path: &std::path::Path| {
            let options = Options::new([
                ("path".to_string(), path.display().to_string()),
                ("follow".to_string(), "true".to_string()),
                ("poll.interval.ms".to_string(), "5".to_string()),
                ("batch.rows".to_string(), "1".to_string()),
            ])
            .unwrap();
            FileSource::try_new(schema(), options, Some(Encoding::Csv { delimiter: b',', header: true })).unwrap()
        };
        let ids = |batch: RecordBatch| -> Vec<i64> {
            batch.column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap().values().to_vec()
        };
        let mut first = open_one_row(file.path());
        assert_eq!(ids(first.next_batch().await.unwrap().unwrap()), [1]);
        let after_one = first.position().unwrap();
        assert_eq!(ids(first.next_batch().await.unwrap().unwrap()), [2]);
        // The partial line "3," is read but not handed out: the position stops before it.
        assert!(first.next_batch().now_or_never().is_none());
        let after_two = first.position().unwrap();

        let mut again = open_one_row(file.path());
        again.seek(&after_one).unwrap();
        assert_eq!(ids(again.next_batch().await.unwrap().unwrap()), [2]);
        write!(file, "c\n4,d\n").unwrap();
        let mut resumed = open_one_row(file.path());
        resumed.seek(&after_two).unwrap();
        assert_eq!(ids(resumed.next_batch().await.unwrap().unwrap()), [3]);
        assert_eq!(ids(resumed.next_batch().await.unwrap().unwrap()), [4]);
        // A position that is not one is an error, not a silent start from the beginning.
        assert!(resumed.seek(&[1, 2, 3]).unwrap_err().to_string().contains("damaged"));
    }
}
