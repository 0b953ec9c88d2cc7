//! The plans a session made, kept by statement text, so that a statement sent again is neither parsed nor planned
//! again: each `Parse` of an unnamed statement (pgbench, JDBC, psycopg send one per execution), or the same query
//! in the simple protocol. Plans are kept before optimization and parameters, as DataFusion's SQL planner gives
//! them, so executing one is exactly executing a fresh plan.
//!
//! An entry is good while the catalog's version (relations created or dropped) and the session's settings (every
//! `SET` counts) are those it was planned under; a stale entry is planned again. The cache holds at most [`ENTRIES`]
//! short, shallow statements (see [`MAX_TEXT`]) per kind and starts over when full. Parsing depends on the text alone:
//! the statements of a simple-protocol query string are kept the same way, under fixed versions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The most statements kept, per kind.
const ENTRIES: usize = 256;

/// The longest statement text kept: longer ones are parsed and planned every time. Kept statements are cloned and
/// dropped on the connection's thread, whose stack is small, so only short, shallow ones are kept (a deeply nested
/// expression is parsed and planned on a statement worker's big stack, as it always was); and a session's caches stay
/// small whatever a client sends.
const MAX_TEXT: usize = 1024;

/// How deep a kept statement's expressions may nest (by the parser's over-estimate, which counts chained operators as
/// well as parentheses).
const MAX_DEPTH: usize = 16;

/// Whether `text` is short and shallow enough to keep (see [`MAX_TEXT`]).
fn keepable(text: &str) -> bool {
    text.len() <= MAX_TEXT && weir_planner::parse::nests_at_most(text, MAX_DEPTH)
}

/// Plans of type `T` by statement text.
#[derive(Debug)]
pub(crate) struct PlanCache<T> {
    entries: Mutex<HashMap<String, (Versions, T)>>,
}

/// What a plan was made under: the catalog's version and the session's settings' version.
type Versions = (u64, u64);

impl<T: Clone> PlanCache<T> {
    pub(crate) fn new() -> Self {
        PlanCache { entries: Mutex::new(HashMap::new()) }
    }

    /// The plan of `text`, if one made under `versions` is kept.
    pub(crate) fn get(&self, text: &str, versions: Versions) -> Option<T> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(text).filter(|(made, _)| *made == versions).map(|(_, plan)| plan.clone())
    }

    /// Keeps the plan `plan` makes (called only when `text` is [`keepable`], so a deep statement is never cloned on a
    /// small stack) as the plan of `text`, made under `versions`.
    pub(crate) fn put(&self, text: &str, versions: Versions, plan: impl FnOnce() -> T) {
        if !keepable(text) {
            return;
        }
        let plan = plan();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= ENTRIES && !entries.contains_key(text) {
            entries.clear();
        }
        entries.insert(text.to_string(), (versions, plan));
    }
}

/// Counts a session's changes of settings.
#[derive(Debug, Default)]
pub(crate) struct SettingsVersion(AtomicU64);

impl SettingsVersion {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_good_only_under_the_versions_it_was_made_under() {
        let cache = PlanCache::new();
        cache.put("SELECT 1", (3, 0), || "plan");
        assert_eq!(cache.get("SELECT 1", (3, 0)), Some("plan"));
        assert_eq!(cache.get("SELECT 1", (4, 0)), None, "the catalog changed");
        assert_eq!(cache.get("SELECT 1", (3, 1)), None, "a setting changed");
        assert_eq!(cache.get("SELECT 2", (3, 0)), None);
        for n in 0..ENTRIES {
            cache.put(&format!("SELECT {n} + 1"), (3, 0), || "other");
        }
        assert!(cache.entries.lock().unwrap().len() <= ENTRIES, "the cache stays bounded");
        let long = format!("SELECT '{}'", "x".repeat(MAX_TEXT));
        cache.put(&long, (3, 0), || "long");
        assert_eq!(cache.get(&long, (3, 0)), None, "a long text is not kept");
        let deep = format!("SELECT {}1{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        cache.put(&deep, (3, 0), || "deep");
        assert_eq!(cache.get(&deep, (3, 0)), None, "a deeply nested text is not kept");
        let chained = format!("SELECT 1{}", " + 1".repeat(MAX_DEPTH + 1));
        cache.put(&chained, (3, 0), || "chained");
        assert_eq!(cache.get(&chained, (3, 0)), None, "a long chain of operators is not kept");
        assert!(keepable("SELECT * FROM per_key WHERE k = $1"));
    }
}
