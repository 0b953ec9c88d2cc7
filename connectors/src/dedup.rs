//! `'dedup.key' = 'column [, ...]'`: drops a row whose key was already read within `'dedup.retention'` (10 minutes
//! unless set).
//!
//! At-least-once delivery (MQTT QoS 1, a Kafka producer's retries) can deliver a record twice; a source whose
//! records carry an identity (a device and a sequence number, a payment id) declares it, and Weir keeps each
//! key it has read for the retention, so a redelivered record is counted once. The dropped rows are counted in
//! [`SourceStats::duplicates`]. Memory is bounded by the keys read within the retention.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use weir_common::connector::{ConnectorError, Options, Rejected, SourceReader, SourceStats};

/// How long keys are remembered unless `'dedup.retention'` says otherwise.
const DEFAULT_RETENTION: Duration = Duration::from_secs(600);

/// A source whose rows are de-duplicated on a key.
#[derive(Debug)]
pub struct Deduplicating {
    inner: Box<dyn SourceReader>,
    columns: Vec<usize>,
    converter: RowConverter,
    retention: Duration,
    /// Every key read within the retention, with when it was read.
    seen: HashMap<Box<[u8]>, Instant>,
    /// The same keys in the order they were read, to forget them once the retention has passed.
    order: VecDeque<(Instant, Box<[u8]>)>,
    dropped: u64,
}

impl Deduplicating {
    /// Wraps `inner` if the options ask for de-duplication (`dedup.key`); takes the `dedup.*` options.
    pub fn wrap(inner: Box<dyn SourceReader>, options: &mut Options) -> Result<Box<dyn SourceReader>, ConnectorError> {
        let retention = options.take_duration("dedup.retention")?;
        let Some(key) = options.take("dedup.key") else {
            if retention.is_some() {
                return Err(ConnectorError::invalid("dedup.retention", "", "needs dedup.key"));
            }
            return Ok(inner);
        };
        Ok(Box::new(Deduplicating::try_new(inner, &key, retention.unwrap_or(DEFAULT_RETENTION))?))
    }

    /// De-duplicates `inner` on the comma-separated columns `key`, remembering keys for `retention`.
    pub fn try_new(inner: Box<dyn SourceReader>, key: &str, retention: Duration) -> Result<Self, ConnectorError> {
        let schema = inner.schema();
        let columns = crate::columns_by_name(&schema, key, "dedup.key")?;
        let fields = columns.iter().map(|c| SortField::new(schema.field(*c).data_type().clone())).collect();
        let converter = RowConverter::new(fields)
            .map_err(|e| ConnectorError::invalid("dedup.key", key, &format!("cannot compare these columns: {e}")))?;
        Ok(Deduplicating {
            inner,
            columns,
            converter,
            retention,
            seen: HashMap::new(),
            order: VecDeque::new(),
            dropped: 0,
        })
    }

    /// The rows of `batch` whose key was not read within the retention.
    fn filter(&mut self, batch: RecordBatch) -> Result<RecordBatch, ConnectorError> {
        let now = Instant::now();
        while let Some((read, _)) = self.order.front()
            && now.duration_since(*read) > self.retention
        {
            if let Some((read, key)) = self.order.pop_front()
                && self.seen.get(&key) == Some(&read)
            {
                self.seen.remove(&key);
            }
        }
        let keys: Vec<_> = self.columns.iter().map(|c| batch.column(*c).clone()).collect();
        let rows = self.converter.convert_columns(&keys).map_err(|e| ConnectorError::Io(format!("dedup.key: {e}")))?;
        let keep: BooleanArray = rows
            .iter()
            .map(|row| {
                let key: Box<[u8]> = row.as_ref().into();
                let new = !self.seen.contains_key(&key);
                if new {
                    self.seen.insert(key.clone(), now);
                    self.order.push_back((now, key));
                }
                Some(new)
            })
            .collect();
        let kept = keep.true_count();
        if kept == batch.num_rows() {
            return Ok(batch);
        }
        self.dropped += (batch.num_rows() - kept) as u64;
        filter_record_batch(&batch, &keep).map_err(|e| ConnectorError::Io(format!("dedup.key: {e}")))
    }
}

#[async_trait]
impl SourceReader for Deduplicating {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    /// The inner source's next batch without the duplicates; a batch of nothing but duplicates is skipped.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            let Some(batch) = self.inner.next_batch().await? else { return Ok(None) };
            let batch = self.filter(batch)?;
            if batch.num_rows() > 0 {
                return Ok(Some(batch));
            }
        }
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        self.inner.take_rejected()
    }

    fn commit(&mut self) {
        self.inner.commit()
    }

    fn wants_commit(&self) -> bool {
        self.inner.wants_commit()
    }

    /// The keys remembered (with how long ago each was read) and the duplicates dropped, after the inner source's
    /// position: a resumed source drops the duplicates a broker redelivers after a crash.
    fn position(&self) -> Option<Vec<u8>> {
        let now = Instant::now();
        let inner = self.inner.position();
        let mut bytes = Vec::new();
        let number = |bytes: &mut Vec<u8>, n: u64| bytes.extend_from_slice(&n.to_be_bytes());
        match &inner {
            Some(position) => {
                number(&mut bytes, position.len() as u64);
                bytes.extend_from_slice(position);
            }
            None => number(&mut bytes, u64::MAX),
        }
        number(&mut bytes, self.dropped);
        number(&mut bytes, self.order.len() as u64);
        for (read, key) in &self.order {
            number(&mut bytes, now.duration_since(*read).as_millis() as u64);
            number(&mut bytes, key.len() as u64);
            bytes.extend_from_slice(key);
        }
        Some(bytes)
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let damaged = || ConnectorError::Io("the checkpointed keys of dedup.key are damaged".to_string());
        let mut rest = position;
        let number = |rest: &mut &[u8]| -> Result<u64, ConnectorError> {
            let (head, tail) = rest.split_at_checked(8).ok_or_else(damaged)?;
            *rest = tail;
            Ok(u64::from_be_bytes(head.try_into().map_err(|_| damaged())?))
        };
        let take = |rest: &mut &[u8], length: u64| -> Result<Vec<u8>, ConnectorError> {
            let (head, tail) =
                rest.split_at_checked(usize::try_from(length).map_err(|_| damaged())?).ok_or_else(damaged)?;
            *rest = tail;
            Ok(head.to_vec())
        };
        let inner = match number(&mut rest)? {
            u64::MAX => None,
            length => Some(take(&mut rest, length)?),
        };
        self.dropped = number(&mut rest)?;
        let now = Instant::now();
        let (mut seen, mut order) = (HashMap::new(), VecDeque::new());
        for _ in 0..number(&mut rest)? {
            let age = Duration::from_millis(number(&mut rest)?);
            let length = number(&mut rest)?;
            let key: Box<[u8]> = take(&mut rest, length)?.into();
            let read = now.checked_sub(age).unwrap_or(now);
            seen.insert(key.clone(), read);
            order.push_back((read, key));
        }
        (self.seen, self.order) = (seen, order);
        match inner {
            Some(inner) => self.inner.seek(&inner),
            None => Ok(()),
        }
    }

    fn last_split(&self) -> usize {
        self.inner.last_split()
    }

    fn split_count(&self) -> usize {
        self.inner.split_count()
    }

    fn health(&self) -> Option<String> {
        self.inner.health()
    }

    fn stats(&self) -> SourceStats {
        SourceStats { duplicates: self.dropped, ..self.inner.stats() }
    }

    fn close(&mut self) {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use futures::FutureExt;

    use super::*;

    /// Hands out fixed batches, then ends.
    #[derive(Debug)]
    struct Batches(VecDeque<RecordBatch>, SchemaRef);

    #[async_trait]
    impl SourceReader for Batches {
        fn schema(&self) -> SchemaRef {
            self.1.clone()
        }
        async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
            Ok(self.0.pop_front())
        }
    }

    fn batch(schema: &SchemaRef, rows: &[(&str, i64, i64)]) -> RecordBatch {
        let devices: StringArray = rows.iter().map(|r| Some(r.0)).collect();
        let sequence: Int64Array = rows.iter().map(|r| Some(r.1)).collect();
        let values: Int64Array = rows.iter().map(|r| Some(r.2)).collect();
        RecordBatch::try_new(schema.clone(), vec![Arc::new(devices), Arc::new(sequence), Arc::new(values)]).unwrap()
    }

    #[test]
    fn rows_with_a_key_already_read_are_dropped_and_counted() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("seq", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
        ]));
        let batches = [
            batch(&schema, &[("a", 1, 10), ("a", 2, 20), ("b", 1, 30), ("a", 1, 99)]),
            batch(&schema, &[("a", 2, 99), ("b", 1, 99)]),
            batch(&schema, &[("b", 2, 40)]),
        ];
        let inner = Box::new(Batches(batches.into_iter().collect(), schema.clone()));
        let mut options = Options::from_pairs(&[("dedup.key", "device, SEQ")]).unwrap();
        let mut source = Deduplicating::wrap(inner, &mut options).unwrap();
        let mut values = Vec::new();
        while let Some(Ok(Some(batch))) = source.next_batch().now_or_never() {
            let column = batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            values.extend(column.values().iter().copied());
        }
        // The second batch is all duplicates and is skipped whole.
        assert_eq!(values, [10, 20, 30, 40]);
        assert_eq!(source.stats().duplicates, 3);
    }

    #[test]
    fn a_resumed_source_remembers_the_keys_it_had_read() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("seq", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
        ]));
        let first = [batch(&schema, &[("a", 1, 10), ("a", 1, 11)])];
        let inner = Box::new(Batches(first.into_iter().collect(), schema.clone()));
        let mut options = Options::from_pairs(&[("dedup.key", "device, seq")]).unwrap();
        let mut source = Deduplicating::wrap(inner, &mut options).unwrap();
        assert_eq!(source.next_batch().now_or_never().unwrap().unwrap().unwrap().num_rows(), 1);
        let position = source.position().unwrap();

        // After a crash the broker redelivers (a, 1) with (a, 2) that was never read.
        let redelivered = [batch(&schema, &[("a", 1, 10), ("a", 2, 20)])];
        let inner = Box::new(Batches(redelivered.into_iter().collect(), schema.clone()));
        let mut options = Options::from_pairs(&[("dedup.key", "device, seq")]).unwrap();
        let mut resumed = Deduplicating::wrap(inner, &mut options).unwrap();
        resumed.seek(&position).unwrap();
        let batch = resumed.next_batch().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap().values(), &[20]);
        assert_eq!(resumed.stats().duplicates, 2, "the count goes on from the checkpoint's");
        assert!(resumed.seek(&position[..position.len() - 1]).is_err());
    }

    #[test]
    fn a_key_is_forgotten_after_the_retention() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("seq", DataType::Int64, true),
            Field::new("value", DataType::Int64, true),
        ]));
        let inner = Box::new(Batches(VecDeque::new(), schema.clone()));
        let mut source = Deduplicating::try_new(inner, "device", Duration::ZERO).unwrap();
        assert_eq!(source.filter(batch(&schema, &[("a", 1, 1)])).unwrap().num_rows(), 1);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(source.filter(batch(&schema, &[("a", 1, 1)])).unwrap().num_rows(), 1);
        assert!(source.seen.len() == 1 && source.order.len() == 1);
        let mut bad = Options::from_pairs(&[("dedup.key", "nope")]).unwrap();
        let inner = Box::new(Batches(VecDeque::new(), schema));
        let err = Deduplicating::wrap(inner, &mut bad).unwrap_err().to_string();
        assert!(err.contains("no column \"nope\""), "{err}");
    }
}
