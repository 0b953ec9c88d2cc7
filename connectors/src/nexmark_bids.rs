//! Nexmark bids generated straight into Arrow columns.
//!
//! The standard generator (the `nexmark` crate, as RisingWave and Arroyo use it) builds each event as a struct of
//! owned strings, which costs more than everything Weir then does with a bid. This generator follows the same
//! recipe, draw for draw from the same seeded random number generator, so `auction`, `bidder`, `price`, `channel`,
//! `url` and `date_time` are exactly the standard generator's (a test compares them), and `extra` has exactly the
//! standard length; only the filler letters of `extra` come from a cheaper draw. Columns nobody asked for are not
//! built.

use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{ArrayRef, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use nexmark::config::NexmarkConfig;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const HOT_AUCTION_RATIO: usize = 100;
const HOT_BIDDER_RATIO: usize = 100;
const CHANNEL_NUMBER: usize = 10_000;
const MIN_STRING_LENGTH: usize = 3;

/// A bid column this generator can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BidColumn {
    Auction,
    Bidder,
    Price,
    Channel,
    Url,
    /// Milliseconds since the epoch.
    DateTime,
    Extra,
}

/// Generates bids in order, each batch continuing where the last ended.
#[derive(Debug)]
pub(crate) struct BidGenerator {
    cfg: NexmarkConfig,
    /// Microseconds between events (of all kinds).
    inter_event_delay: f32,
    proportion_denominator: usize,
    /// Bids generated so far.
    offset: u64,
}

impl BidGenerator {
    /// A generator for `cfg`, whose first and next rates must be equal (a constant rate, as Weir configures it).
    pub(crate) fn new(cfg: NexmarkConfig) -> Self {
        let inter_event_delay = cfg.us_per_unit as f32 / cfg.first_rate as f32 * cfg.num_event_generators as f32;
        let proportion_denominator = cfg.person_proportion + cfg.auction_proportion + cfg.bid_proportion;
        BidGenerator { cfg, inter_event_delay, proportion_denominator, offset: 0 }
    }

    /// Bids generated so far, and the event time of event 0.
    pub(crate) fn position(&self) -> (u64, u64) {
        (self.offset, self.cfg.base_time)
    }

    /// Continues after `offset` bids, event times counted from `base_time`.
    pub(crate) fn seek(&mut self, offset: u64, base_time: u64) {
        self.offset = offset;
        self.cfg.base_time = base_time;
    }

    /// The offset, among events of all kinds, of the next bid.
    pub(crate) fn global_offset(&self) -> u64 {
        self.global_offset_at(0)
    }

    /// The offset, among events of all kinds, of the bid `ahead` bids after the next one.
    pub(crate) fn global_offset_at(&self, ahead: u64) -> u64 {
        let cfg = &self.cfg;
        let offset = (self.offset + ahead) as usize;
        (offset / cfg.bid_proportion * self.proportion_denominator
            + cfg.person_proportion
            + cfg.auction_proportion
            + offset % cfg.bid_proportion) as u64
    }

    /// The next `count` bids as the requested columns, in order.
    pub(crate) fn generate(&mut self, count: usize, columns: &[BidColumn]) -> Vec<ArrayRef> {
        let wants = |c: BidColumn| columns.contains(&c);
        let (want_channel, want_url, want_extra) =
            (wants(BidColumn::Channel), wants(BidColumn::Url), wants(BidColumn::Extra));
        let mut auctions = Int64Builder::with_capacity(count);
        let mut bidders = Int64Builder::with_capacity(count);
        let mut prices = Int64Builder::with_capacity(count);
        let mut times = TimestampMillisecondBuilder::with_capacity(count);
        // Sized for the standard lengths (channels of up to 13 bytes, URLs of up to 90, extras of about 68), so the
        // value buffers rarely grow.
        let sized = |wanted: bool, bytes: usize| {
            if wanted { StringBuilder::with_capacity(count, count * bytes) } else { StringBuilder::new() }
        };
        let (mut channels, mut urls, mut extras) =
            (sized(want_channel, 13), sized(want_url, 90), sized(want_extra, 84));
        let mut extra = Vec::new();
        let cfg = &self.cfg;
        let channel_map = channel_url_map();
        for _ in 0..count {
            let event_number = cfg.first_event_number + self.global_offset() as usize;
            let event_id = cfg.first_event_id + event_number;
            let time = cfg.base_time + ((event_number as f32 * self.inter_event_delay) / 1000.0).round() as u64;
            self.offset += 1;

            // Draw for draw as the standard generator's `Bid::new`.
            let rng = &mut SmallRng::seed_from_u64(event_id as u64);
            let auction = if 0 < rng.gen_range(0..cfg.hot_auction_ratio) {
                (self.last_auction_id(event_id) / HOT_AUCTION_RATIO) * HOT_AUCTION_RATIO
            } else {
                self.next_auction_id(event_id, rng)
            };
            let bidder = if 0 < rng.gen_range(0..cfg.hot_bidder_ratio) {
                (self.last_person_id(event_id) / HOT_BIDDER_RATIO) * HOT_BIDDER_RATIO + 1
            } else {
                self.next_person_id(event_id, rng)
            };
            let price = (10.0_f32.powf(rng.r#gen::<f32>() * 6.0) * 100.0).round() as usize;
            let (channel, url) = if rng.gen_range(0..cfg.hot_channel_ratio) > 0 {
                let index = rng.gen_range(0..cfg.hot_channels.len());
                (cfg.hot_channels[index].as_str(), cfg.hot_urls[index].as_str())
            } else {
                let (channel, url) = channel_map.choose(rng).map_or(("", ""), |(c, u)| (c.as_str(), u.as_str()));
                (channel, url)
            };
            auctions.append_value((auction + cfg.first_auction_id) as i64);
            bidders.append_value((bidder + cfg.first_person_id) as i64);
            prices.append_value(price as i64);
            times.append_value(time as i64);
            if want_channel {
                channels.append_value(channel);
            }
            if want_url {
                urls.append_value(url);
            }
            if want_extra {
                let length = extra_length(rng, 8 + 8 + 8 + 8, cfg.avg_bid_byte_size);
                letters(rng, length, &mut extra);
                extras.append_value(std::str::from_utf8(&extra).unwrap_or_default());
            }
        }
        let mut built: Vec<(BidColumn, ArrayRef)> = vec![
            (BidColumn::Auction, Arc::new(auctions.finish())),
            (BidColumn::Bidder, Arc::new(bidders.finish())),
            (BidColumn::Price, Arc::new(prices.finish())),
            (BidColumn::DateTime, Arc::new(times.finish())),
        ];
        if want_channel {
            built.push((BidColumn::Channel, Arc::new(channels.finish())));
        }
        if want_url {
            built.push((BidColumn::Url, Arc::new(urls.finish())));
        }
        if want_extra {
            built.push((BidColumn::Extra, Arc::new(extras.finish())));
        }
        columns
            .iter()
            .map(|c| built.iter().find(|(b, _)| b == c).map(|(_, array)| array.clone()))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    fn last_person_id(&self, event_id: usize) -> usize {
        let cfg = &self.cfg;
        let epoch = event_id / self.proportion_denominator;
        let offset = (event_id % self.proportion_denominator).min(cfg.person_proportion - 1);
        epoch * cfg.person_proportion + offset
    }

    fn next_person_id(&self, event_id: usize, rng: &mut SmallRng) -> usize {
        let people = self.last_person_id(event_id) + 1;
        let active = people.min(self.cfg.active_people);
        people - active + rng.gen_range(0..active + self.cfg.person_id_lead)
    }

    fn last_auction_id(&self, event_id: usize) -> usize {
        let cfg = &self.cfg;
        let mut epoch = event_id / self.proportion_denominator;
        let mut offset = event_id % self.proportion_denominator;
        if offset < cfg.person_proportion {
            epoch = epoch.saturating_sub(1);
            offset = cfg.auction_proportion - 1;
        } else if cfg.person_proportion + cfg.auction_proportion <= offset {
            offset = cfg.auction_proportion - 1;
        } else {
            offset -= cfg.person_proportion;
        }
        epoch * cfg.auction_proportion + offset
    }

    fn next_auction_id(&self, event_id: usize, rng: &mut SmallRng) -> usize {
        let max_auction = self.last_auction_id(event_id);
        let min_auction = max_auction.saturating_sub(self.cfg.in_flight_auctions);
        min_auction + rng.gen_range(0..max_auction - min_auction + 1 + self.cfg.auction_id_lead)
    }
}

/// The length the standard generator gives `extra`: about `average - current` letters, give or take a fifth.
fn extra_length(rng: &mut SmallRng, current_size: usize, average: usize) -> usize {
    if current_size > average {
        return 0;
    }
    let average = average - current_size;
    let delta = (average + 2) / 5;
    let min_size = average - delta;
    min_size + if delta == 0 { 0 } else { rng.gen_range(0..2 * delta) }
}

/// `length` lowercase letters, eight from each 64-bit draw.
fn letters(rng: &mut SmallRng, length: usize, into: &mut Vec<u8>) {
    into.clear();
    while into.len() < length {
        let draw = rng.next_u64().to_le_bytes();
        let take = (length - into.len()).min(8);
        into.extend(draw[..take].iter().map(|byte| b'a' + byte % 26));
    }
}

/// The standard generator's 10,000 channels and their URLs.
fn channel_url_map() -> &'static [(String, String)] {
    static MAP: OnceLock<Vec<(String, String)>> = OnceLock::new();
    MAP.get_or_init(|| {
        (0..CHANNEL_NUMBER)
            .map(|i| {
                let mut url = base_url(i as u64);
                let mut rng = SmallRng::seed_from_u64(i as u64);
                if rng.gen_range(0..10) > 0 {
                    url.push_str("&channel_id=");
                    url.push_str(&i64::abs((i as i32).reverse_bits() as i64).to_string());
                }
                (format!("channel-{i}"), url)
            })
            .collect()
    })
}

fn base_url(seed: u64) -> String {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut id = || -> String {
        let length = rng.gen_range(MIN_STRING_LENGTH..5);
        (0..length).map(|_| if rng.gen_range(0..13) == 0 { '_' } else { rng.gen_range(b'a'..=b'z') as char }).collect()
    };
    let (id0, id1, id2) = (id(), id(), id());
    format!("https://www.nexmark.com/{id0}/{id1}/{id2}/item.htm?query=1")
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Int64Type, TimestampMillisecondType};
    use nexmark::EventGenerator;
    use nexmark::event::{Event, EventType};

    use super::*;

    fn config() -> NexmarkConfig {
        NexmarkConfig {
            base_time: 1_704_067_200_000,
            first_rate: 1_000_000,
            next_rate: 1_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn bids_are_the_standard_generators() {
        let mut standard = EventGenerator::new(config()).with_type_filter(EventType::Bid);
        let mut ours = BidGenerator::new(config());
        let all = [
            BidColumn::Auction,
            BidColumn::Bidder,
            BidColumn::Price,
            BidColumn::Channel,
            BidColumn::Url,
            BidColumn::DateTime,
            BidColumn::Extra,
        ];
        for batch in 0..4 {
            assert_eq!(ours.global_offset(), standard.global_offset(), "batch {batch}");
            let columns = ours.generate(5_000, &all);
            for i in 0..5_000 {
                let Some(Event::Bid(bid)) = standard.next() else { panic!("not a bid") };
                let int = |c: usize| columns[c].as_primitive::<Int64Type>().value(i);
                assert_eq!(int(0), bid.auction as i64);
                assert_eq!(int(1), bid.bidder as i64);
                assert_eq!(int(2), bid.price as i64);
                assert_eq!(columns[3].as_string::<i32>().value(i), bid.channel);
                assert_eq!(columns[4].as_string::<i32>().value(i), bid.url);
                assert_eq!(columns[5].as_primitive::<TimestampMillisecondType>().value(i), bid.date_time as i64);
                let extra = columns[6].as_string::<i32>().value(i);
                assert_eq!(extra.len(), bid.extra.len());
                assert!(extra.bytes().all(|b| b.is_ascii_lowercase()));
            }
        }
    }

    #[test]
    fn only_the_requested_columns_are_built_in_the_requested_order() {
        let mut ours = BidGenerator::new(config());
        let columns = ours.generate(10, &[BidColumn::DateTime, BidColumn::Auction]);
        assert_eq!(columns.len(), 2);
        assert_eq!(columns[0].len(), 10);
        assert!(columns[0].as_primitive_opt::<TimestampMillisecondType>().is_some());
        assert!(columns[1].as_primitive_opt::<Int64Type>().is_some());
    }
}
