//! Holding a source to a rate.

use std::time::Duration;

use tokio::time::Instant;

/// Paces rows to `rows_per_second` from the moment the source started (0: as fast as possible).
#[derive(Debug)]
pub struct Pacer {
    rows_per_second: u64,
    /// When row 0 was due; row `n` is due `n / rate` seconds later, so a slow consumer never makes the source burst.
    started: Option<Instant>,
    /// The source never ends.
    endless: bool,
}

impl Pacer {
    pub fn new(rows_per_second: u64) -> Self {
        Pacer { rows_per_second, started: None, endless: false }
    }

    /// Marks the source as one that never ends: at full speed it then yields before each batch, so that a reader
    /// asking for what is ready at once (`FLUSH`) gets a batch at a time instead of an endless stream.
    pub fn endless(mut self, endless: bool) -> Self {
        self.endless = endless;
        self
    }

    /// Continues a source that stopped at row `row`: that row is due now, later rows at the rate from here.
    pub fn resume_at(&mut self, row: u64) {
        if self.rows_per_second > 0 {
            let behind = Duration::from_secs_f64(row as f64 / self.rows_per_second as f64);
            let now = Instant::now();
            self.started = Some(now.checked_sub(behind).unwrap_or(now));
        }
    }

    /// How many rows to produce at once: about a tenth of a second's worth, at most 8192.
    pub fn batch_size(&self) -> usize {
        match self.rows_per_second {
            0 => 8192,
            rate => (rate / 10).clamp(1, 8192) as usize,
        }
    }

    /// Waits until row `row` is due.
    pub async fn wait_for(&mut self, row: u64) {
        if self.rows_per_second == 0 {
            if self.endless {
                tokio::task::yield_now().await;
            }
            return;
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        let due = started + Duration::from_secs_f64(row as f64 / self.rows_per_second as f64);
        tokio::time::sleep_until(due).await;
    }
}
