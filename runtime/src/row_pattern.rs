//! Matching row patterns a row at a time, for `MATCH_RECOGNIZE` over streams.
//!
//! A [`Pattern`] is compiled into a [`Program`] of instructions and run as a list of threads in preference order (a Pike
//! VM). Unlike a regular-expression VM, threads at one instruction are not merged: each keeps the rows it matched,
//! because a `DEFINE` condition may look at them (`LAST(H.vendor)`, `SUM(H.amount)`). Threads branch at every
//! quantifier and alternative, so the rows they matched are kept in a [`Trail`] shared by the attempt's threads: a
//! thread holds its last row, each row its predecessor, and branching copies nothing. The first thread, in preference
//! order, to reach the end of the program is the match; lower-preference threads are dropped then, higher ones run on
//! and may still give the preferred match. So a match is decided as soon as no thread preferred to it is alive, which
//! is what lets a stream emit it without waiting for the partition to end. The result equals
//! [`Pattern::reference_match`]'s, the backtracking definition of the preference rules (tested on random patterns).

use weir_common::pattern::{Classified, Pattern};

/// Most instructions a compiled pattern may have (bounded quantifiers are unrolled).
pub const MAX_INSTRUCTIONS: usize = 100_000;

/// Most threads one match attempt may run at once; a pattern and input that need more are refused, not run out of
/// memory.
pub const MAX_THREADS: usize = 100_000;

/// Why a pattern cannot be matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the row pattern is too large once its quantifiers are expanded (more than {MAX_INSTRUCTIONS} steps)")]
    TooLarge,
    #[error("matching the row pattern needs more than {MAX_THREADS} partial matches at once")]
    TooManyThreads,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Instruction {
    /// Consume one row classified as this variable.
    Row(usize),
    /// Go on at both, the first preferred.
    Split(usize, usize),
    Jump(usize),
    /// `^` / `$`.
    Start,
    End,
    /// Remember the current row in a register (the start of a repetition's iteration).
    Mark(usize),
    /// If the iteration begun at the register's row matched no row, leave the repetition (to the target).
    LeaveIfEmpty(usize, usize),
    /// Enter / leave `{- -}`.
    ExcludeIn,
    ExcludeOut,
    Match,
}

/// A compiled row pattern.
#[derive(Debug, Clone)]
pub struct Program {
    instructions: Vec<Instruction>,
    registers: usize,
}

/// A match attempt under way: the partial matches alive, in preference order, and the best match so far.
#[derive(Debug, Clone)]
pub struct Attempt {
    threads: Threads,
    /// The rows the threads matched.
    trail: Trail,
    /// The trail's length above which it is compacted to the rows live threads hold.
    compact_above: usize,
    best: Option<Vec<Classified>>,
    /// The position of the row the threads wait for.
    at: usize,
    /// An empty list, its allocation kept for the next step's threads.
    spare: Threads,
}

/// Threads of an attempt: most attempts run one or two at a time, kept in the attempt itself (so in the partition
/// that waits with it) until they are more.
type Threads = smallvec::SmallVec<[Thread; 2]>;

/// Trails shorter than this are never compacted.
const COMPACT_MIN: usize = 4096;

impl Attempt {
    /// The first row of the attempt's partial matches still kept (for dropping the rows before it).
    pub fn first_row(&self) -> Option<usize> {
        let firsts = self.threads.iter().filter_map(|t| self.trail.rows(t.last).first_row());
        firsts.chain(self.best.iter().filter_map(|m| m.first().map(|c| c.row))).min()
    }
}

/// One partial match.
#[derive(Debug, Clone)]
struct Thread {
    pc: usize,
    /// Where each repetition's current iteration began (most patterns have one or two repetitions: no allocation).
    registers: smallvec::SmallVec<[usize; 2]>,
    excluded: u32,
    /// Its last matched row in the attempt's trail ([`NONE`] before the first).
    last: u32,
}

/// No row of a trail: the predecessor of a match's first row.
const NONE: u32 = u32::MAX;

/// The rows partial matches matched, as a tree of shared prefixes: each row is stored once with its predecessor, and a
/// partial match is named by its last row. Rows are only added (after their predecessors), so a row's index is above
/// its predecessor's. The partial matches of an attempt all begin at its first row (a match is the rows from there on,
/// one after the other), which the trail keeps once.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    /// Most attempts hold a few rows: kept in the trail itself until they are more.
    steps: smallvec::SmallVec<[Step; 4]>,
    first_row: usize,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    classified: Classified,
    previous: u32,
    /// How many rows the match has up to this one.
    len: u32,
}

impl Trail {
    /// A trail holding `rows` as one partial match, and its last row.
    #[cfg(test)]
    pub fn of(rows: &[Classified]) -> (Trail, u32) {
        let mut trail = Trail::default();
        let last = rows.iter().fold(NONE, |last, c| trail.push(last, *c));
        (trail, last)
    }

    /// The partial match ending at `last` (as [`Trail::push`] returned it, or [`NONE`] for none).
    pub fn rows(&self, last: u32) -> MatchedRows<'_> {
        MatchedRows { steps: &self.steps, last, first_row: self.first_row }
    }

    /// Adds `classified` after the partial match ending at `last`; returns the new match's last row.
    fn push(&mut self, last: u32, classified: Classified) -> u32 {
        let len = match self.steps.get(last as usize) {
            Some(step) => step.len + 1,
            None => {
                self.first_row = classified.row;
                1
            }
        };
        self.steps.push(Step { classified, previous: last, len });
        (self.steps.len() - 1) as u32
    }

    /// Whether the partial matches ending at `a` and `b` hold the same rows.
    fn same(&self, mut a: u32, mut b: u32) -> bool {
        while a != b {
            match (self.steps.get(a as usize), self.steps.get(b as usize)) {
                (Some(x), Some(y)) if x.classified == y.classified && x.len == y.len => {
                    a = x.previous;
                    b = y.previous;
                }
                _ => return false,
            }
        }
        true
    }

    /// Keeps only the rows of the `threads`' partial matches, renumbering them (in place).
    fn compact(&mut self, threads: &mut [Thread]) {
        let mut live = vec![false; self.steps.len()];
        for thread in threads.iter() {
            let mut at = thread.last;
            while let Some(step) = self.steps.get(at as usize) {
                if std::mem::replace(&mut live[at as usize], true) {
                    break;
                }
                at = step.previous;
            }
        }
        // Predecessors come first, so each is renumbered before the rows after it.
        let mut renumbered = vec![NONE; self.steps.len()];
        let mut kept = 0;
        for index in 0..self.steps.len() {
            if live[index] {
                let mut step = self.steps[index];
                if step.previous != NONE {
                    step.previous = renumbered[step.previous as usize];
                }
                self.steps[kept] = step;
                renumbered[index] = kept as u32;
                kept += 1;
            }
        }
        self.steps.truncate(kept);
        for thread in threads {
            if thread.last != NONE {
                thread.last = renumbered[thread.last as usize];
            }
        }
    }
}

/// The rows a partial match matched so far, in a [`Trail`]: read from the last back.
#[derive(Debug, Clone, Copy)]
pub struct MatchedRows<'t> {
    steps: &'t [Step],
    last: u32,
    first_row: usize,
}

impl<'t> MatchedRows<'t> {
    pub fn len(&self) -> usize {
        self.steps.get(self.last as usize).map_or(0, |s| s.len as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of the first row.
    pub fn first_row(&self) -> Option<usize> {
        (!self.is_empty()).then_some(self.first_row)
    }

    pub fn last(&self) -> Option<Classified> {
        self.steps.get(self.last as usize).map(|s| s.classified)
    }

    /// The rows from the last back to the first.
    pub fn iter_rev(&self) -> impl Iterator<Item = Classified> + 't {
        let steps = self.steps;
        let mut at = self.last;
        std::iter::from_fn(move || {
            let step = steps.get(at as usize)?;
            at = step.previous;
            Some(step.classified)
        })
    }

    /// The rows in order, into `out` (cleared first).
    pub fn write_to(&self, out: &mut Vec<Classified>) {
        out.clear();
        out.extend(self.iter_rev());
        out.reverse();
    }

    pub fn to_vec(&self) -> Vec<Classified> {
        let mut out = Vec::with_capacity(self.len());
        self.write_to(&mut out);
        out
    }
}

impl Program {
    pub fn compile(pattern: &Pattern) -> Result<Self, PatternError> {
        let mut program = Program { instructions: Vec::new(), registers: 0 };
        program.emit(pattern)?;
        program.push(Instruction::Match)?;
        Ok(program)
    }

    fn push(&mut self, instruction: Instruction) -> Result<usize, PatternError> {
        if self.instructions.len() >= MAX_INSTRUCTIONS {
            return Err(PatternError::TooLarge);
        }
        self.instructions.push(instruction);
        Ok(self.instructions.len() - 1)
    }

    fn emit(&mut self, pattern: &Pattern) -> Result<(), PatternError> {
        match pattern {
            Pattern::Var(variable) => {
                self.push(Instruction::Row(*variable))?;
            }
            Pattern::Start => {
                self.push(Instruction::Start)?;
            }
            Pattern::End => {
                self.push(Instruction::End)?;
            }
            Pattern::Concat(parts) => {
                for part in parts {
                    self.emit(part)?;
                }
            }
            Pattern::Alt(parts) => {
                // Split(first, next) ... each alternative jumps to the end.
                let mut jumps = Vec::new();
                for (n, part) in parts.iter().enumerate() {
                    if n + 1 < parts.len() {
                        let split = self.push(Instruction::Split(0, 0))?;
                        self.emit(part)?;
                        jumps.push(self.push(Instruction::Jump(0))?);
                        let next = self.instructions.len();
                        self.instructions[split] = Instruction::Split(split + 1, next);
                    } else {
                        self.emit(part)?;
                    }
                }
                let end = self.instructions.len();
                for jump in jumps {
                    self.instructions[jump] = Instruction::Jump(end);
                }
            }
            Pattern::Exclude(inner) => {
                self.push(Instruction::ExcludeIn)?;
                self.emit(inner)?;
                self.push(Instruction::ExcludeOut)?;
            }
            Pattern::Repeat { inner, min, max, greedy } => {
                let register = self.registers;
                self.registers += 1;
                // Every exit (an empty iteration, declining another) goes to the end, patched at the end.
                let mut exits = Vec::new();
                let iteration = |program: &mut Program, exits: &mut Vec<usize>| -> Result<(), PatternError> {
                    program.push(Instruction::Mark(register))?;
                    program.emit(inner)?;
                    exits.push(program.push(Instruction::LeaveIfEmpty(register, 0))?);
                    Ok(())
                };
                for _ in 0..*min {
                    iteration(self, &mut exits)?;
                }
                match max {
                    None => {
                        let split = self.push(Instruction::Split(0, 0))?;
                        iteration(self, &mut exits)?;
                        self.push(Instruction::Jump(split))?;
                        exits.push(split);
                    }
                    Some(max) => {
                        for _ in *min..*max {
                            exits.push(self.push(Instruction::Split(0, 0))?);
                            iteration(self, &mut exits)?;
                        }
                    }
                }
                let end = self.instructions.len();
                for at in exits {
                    self.instructions[at] = match self.instructions[at] {
                        Instruction::LeaveIfEmpty(register, _) => Instruction::LeaveIfEmpty(register, end),
                        // Another iteration starts right after the split; declining it goes to the end.
                        Instruction::Split(..) if *greedy => Instruction::Split(at + 1, end),
                        Instruction::Split(..) => Instruction::Split(end, at + 1),
                        other => other,
                    };
                }
            }
        }
        Ok(())
    }

    /// The preferred match starting at row `start` of a partition of `rows` rows, fed a row at a time; `accepts` as
    /// for [`Pattern::reference_match`].
    pub fn match_at(
        &self,
        rows: usize,
        start: usize,
        accepts: &mut dyn FnMut(usize, usize, MatchedRows<'_>) -> bool,
    ) -> Result<Option<Vec<Classified>>, PatternError> {
        let mut attempt = self.begin(start, rows, false)?;
        match self.advance(&mut attempt, rows, true, accepts)? {
            Some(decided) => Ok(decided),
            None => Ok(attempt.best),
        }
    }

    /// Begins a match attempt at row `start`, with `rows` rows known so far (`ended`: all there will be).
    pub fn begin(&self, start: usize, rows: usize, ended: bool) -> Result<Attempt, PatternError> {
        self.begin_in(None, start, rows, ended)
    }

    /// [`Program::begin`], in the allocations of a decided attempt when one is given (what it held is dropped).
    pub fn begin_in(
        &self,
        used: Option<Attempt>,
        start: usize,
        rows: usize,
        ended: bool,
    ) -> Result<Attempt, PatternError> {
        let mut attempt = used.unwrap_or_else(|| Attempt {
            threads: Threads::new(),
            trail: Trail::default(),
            compact_above: COMPACT_MIN,
            best: None,
            at: start,
            spare: Threads::new(),
        });
        attempt.threads.clear();
        attempt.trail.steps.clear();
        attempt.compact_above = COMPACT_MIN;
        attempt.best = None;
        attempt.at = start;
        let first =
            Thread { pc: 0, registers: smallvec::smallvec![usize::MAX; self.registers], excluded: 0, last: NONE };
        self.add(&mut attempt.threads, &attempt.trail, first, start, rows, ended)?;
        Ok(attempt)
    }

    /// Runs `attempt` over the rows known so far: `rows` of them, and `ended` when no more will come. Returns the
    /// decision (the preferred match, or none) once no thread preferred to the best match so far is alive; `None`
    /// while some such thread waits for a row not known yet.
    pub fn advance(
        &self,
        attempt: &mut Attempt,
        rows: usize,
        ended: bool,
        accepts: &mut dyn FnMut(usize, usize, MatchedRows<'_>) -> bool,
    ) -> Result<Option<Option<Vec<Classified>>>, PatternError> {
        loop {
            let at = attempt.at;
            if ended && at == rows && attempt.threads.iter().any(|t| self.instructions[t.pc] == Instruction::End) {
                // The end of the partition came: threads waiting for it go on.
                let mut resolved = Threads::new();
                for mut thread in std::mem::take(&mut attempt.threads) {
                    match self.instructions[thread.pc] {
                        Instruction::End => {
                            thread.pc += 1;
                            self.add(&mut resolved, &attempt.trail, thread, at, rows, ended)?;
                        }
                        _ if resolved.iter().any(|t| t.same(&thread, &attempt.trail)) => {}
                        _ => resolved.push(thread),
                    }
                }
                attempt.threads = resolved;
            }
            // A thread that has matched is preferred to every thread after it: those are dropped.
            if let Some(first) = attempt.threads.iter().position(|t| self.instructions[t.pc] == Instruction::Match) {
                let last = attempt.threads.swap_remove(first).last;
                attempt.best = Some(attempt.trail.rows(last).to_vec());
                attempt.threads.truncate(first);
            }
            if attempt.threads.is_empty() {
                return Ok(Some(attempt.best.take()));
            }
            if at >= rows {
                if ended {
                    // No row left for the threads waiting for one.
                    attempt.threads.clear();
                    continue;
                }
                return Ok(None);
            }
            let mut next = std::mem::take(&mut attempt.spare);
            for thread in attempt.threads.drain(..) {
                match self.instructions[thread.pc] {
                    Instruction::Row(variable) if accepts(variable, at, attempt.trail.rows(thread.last)) => {
                        let mut thread = thread;
                        let excluded = thread.excluded > 0;
                        thread.last = attempt.trail.push(thread.last, Classified { row: at, variable, excluded });
                        thread.pc += 1;
                        self.add(&mut next, &attempt.trail, thread, at + 1, rows, ended)?;
                    }
                    // A row not accepted, or one where the end of the partition was awaited.
                    _ => {}
                }
            }
            attempt.spare = std::mem::replace(&mut attempt.threads, next);
            attempt.at = at + 1;
            if attempt.trail.steps.len() > attempt.compact_above {
                // Rows of partial matches no longer alive go, so a long attempt keeps what its threads hold.
                attempt.trail.compact(&mut attempt.threads);
                attempt.compact_above = (2 * attempt.trail.steps.len()).max(COMPACT_MIN);
            }
        }
    }

    /// Drops the threads of `attempt` that wait for a row and for which `expired` holds of the rows they matched
    /// (`WITHIN` passed for them); [`Program::advance`] then decides the attempt if no preferred thread is left.
    /// Returns the rows of the most preferred thread dropped, when `keep` asks for them.
    pub fn expire(
        &self,
        attempt: &mut Attempt,
        expired: &mut dyn FnMut(MatchedRows<'_>) -> bool,
        keep: bool,
    ) -> Option<Vec<Classified>> {
        let mut preferred = None;
        let trail = &attempt.trail;
        attempt.threads.retain(|t| {
            let dropped = matches!(self.instructions[t.pc], Instruction::Row(_)) && expired(trail.rows(t.last));
            if dropped && keep && preferred.is_none() {
                preferred = Some(trail.rows(t.last).to_vec());
            }
            !dropped
        });
        preferred
    }

    /// Follows `thread` through the instructions that consume no row, at row `at`, adding every thread that waits
    /// for a row (or has matched) to `threads` in preference order.
    /// A thread at `$` before the partition ended waits there.
    fn add(
        &self,
        threads: &mut Threads,
        trail: &Trail,
        mut thread: Thread,
        at: usize,
        rows: usize,
        ended: bool,
    ) -> Result<(), PatternError> {
        loop {
            let waits = |instruction| match instruction {
                Instruction::Row(_) | Instruction::Match => true,
                Instruction::End => at == rows && !ended,
                _ => false,
            };
            match self.instructions[thread.pc] {
                instruction if waits(instruction) => {
                    // The same thread reached twice (by equal paths) has the same future: keep the preferred one.
                    if !threads.iter().any(|t| t.same(&thread, trail)) {
                        if threads.len() >= MAX_THREADS {
                            return Err(PatternError::TooManyThreads);
                        }
                        threads.push(thread);
                    }
                    return Ok(());
                }
                Instruction::Split(first, second) => {
                    let mut other = thread.clone();
                    other.pc = second;
                    thread.pc = first;
                    self.add(threads, trail, thread, at, rows, ended)?;
                    thread = other;
                }
                Instruction::Jump(target) => thread.pc = target,
                Instruction::Start if at == 0 => thread.pc += 1,
                Instruction::End if at == rows && ended => thread.pc += 1,
                Instruction::Start | Instruction::End | Instruction::Row(_) | Instruction::Match => return Ok(()),
                Instruction::Mark(register) => {
                    thread.registers[register] = at;
                    thread.pc += 1;
                }
                Instruction::LeaveIfEmpty(register, end) => {
                    thread.pc = if thread.registers[register] == at { end } else { thread.pc + 1 };
                }
                Instruction::ExcludeIn => {
                    thread.excluded += 1;
                    thread.pc += 1;
                }
                Instruction::ExcludeOut => {
                    thread.excluded -= 1;
                    thread.pc += 1;
                }
            }
        }
    }
}

impl Thread {
    /// Whether `other` has the same future: the same place in the program, registers and rows.
    fn same(&self, other: &Thread, trail: &Trail) -> bool {
        self.pc == other.pc
            && self.excluded == other.excluded
            && self.registers == other.registers
            && trail.same(self.last, other.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64), so failures reproduce from the printed seed.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random pattern over three variables, `depth` levels deep.
    fn pattern(random: &mut Random, depth: u32) -> Pattern {
        let leaf = |random: &mut Random| match random.below(12) {
            0 => Pattern::Start,
            1 => Pattern::End,
            _ => Pattern::Var(random.below(3) as usize),
        };
        if depth == 0 {
            return leaf(random);
        }
        match random.below(7) {
            0 | 1 => leaf(random),
            2 => Pattern::Concat((0..1 + random.below(3)).map(|_| pattern(random, depth - 1)).collect()),
            3 => Pattern::Alt((0..2 + random.below(2)).map(|_| pattern(random, depth - 1)).collect()),
            4 | 5 => {
                let min = random.below(3) as u32;
                let max = match random.below(3) {
                    0 => None,
                    _ => Some(min + random.below(3) as u32),
                };
                Pattern::Repeat { inner: Box::new(pattern(random, depth - 1)), min, max, greedy: random.below(2) == 0 }
            }
            _ => match random.below(2) {
                0 => Pattern::Exclude(Box::new(pattern(random, depth - 1))),
                _ => Pattern::permute((0..2 + random.below(2)).map(|_| pattern(random, depth - 1)).collect()),
            },
        }
    }

    #[test]
    fn the_program_finds_the_reference_match_on_random_patterns_and_rows() {
        let mut random = Random(20261129);
        for case in 0..3000 {
            let pattern = pattern(&mut random, 3);
            let rows = random.below(9) as usize;
            // Each row has a value and satisfies a random subset of the variables' own conditions; variable 2 also
            // needs a value above the last matched row's, so conditions look at the match so far.
            let values: Vec<u64> = (0..rows).map(|_| random.below(5)).collect();
            let holds: Vec<[bool; 3]> =
                (0..rows).map(|_| [random.below(3) > 0, random.below(2) == 0, random.below(3) > 0]).collect();
            let holds_after = |variable: usize, row: usize, last: Option<Classified>| {
                holds[row][variable] && (variable != 2 || last.is_none_or(|last| values[row] > values[last.row]))
            };
            let program = Program::compile(&pattern).unwrap();
            for start in 0..=rows {
                let expected =
                    pattern.reference_match(rows, start, &mut |v, row, m| holds_after(v, row, m.last().copied()));
                let got = program.match_at(rows, start, &mut |v, row, m| holds_after(v, row, m.last())).unwrap();
                assert_eq!(
                    got, expected,
                    "case {case}: pattern {pattern}, rows {holds:?} values {values:?}, start {start}"
                );
            }
        }
    }

    /// Fed a few rows at a time, with the threads `WITHIN` rules out dropped as the rows' time passes, the program
    /// decides the same matches as the reference over all the rows: a stream finds what a batch query finds.
    #[test]
    fn rows_fed_a_few_at_a_time_with_expiry_give_the_reference_match() {
        let mut random = Random(4242);
        for case in 0..3000 {
            let pattern = pattern(&mut random, 3);
            let rows = 1 + random.below(9) as usize;
            let holds: Vec<[bool; 3]> =
                (0..rows).map(|_| [random.below(3) > 0, random.below(2) == 0, random.below(3) > 0]).collect();
            // A row's time is its position; WITHIN allows `within` time units from a match's first row.
            let within = match random.below(3) {
                0 => None,
                _ => Some(random.below(4) as usize),
            };
            let holds_from = |variable: usize, row: usize, first: Option<usize>| {
                holds[row][variable] && within.is_none_or(|w| first.is_none_or(|f| row - f <= w))
            };
            let mut accepts = |v, row, m: MatchedRows<'_>| holds_from(v, row, m.first_row());
            let program = Program::compile(&pattern).unwrap();
            for start in 0..rows {
                let expected =
                    pattern.reference_match(rows, start, &mut |v, row, m| holds_from(v, row, m.first().map(|f| f.row)));
                let mut known = start + 1 + random.below((rows - start) as u64) as usize;
                let mut attempt = program.begin(start, known, false).unwrap();
                let got = loop {
                    if case % 2 == 1 {
                        // Compacts the trail after the next step: the rows live threads hold are kept.
                        attempt.compact_above = 0;
                    }
                    if let Some(decided) = program.advance(&mut attempt, known, false, &mut accepts).unwrap() {
                        break decided;
                    }
                    if let Some(w) = within {
                        // Rows to come are later than the last known one.
                        program.expire(
                            &mut attempt,
                            &mut |matched| matched.first_row().is_some_and(|f| known - 1 - f >= w),
                            false,
                        );
                    }
                    if known == rows {
                        break program
                            .advance(&mut attempt, rows, true, &mut accepts)
                            .unwrap()
                            .expect("decided at the end");
                    }
                    known = (known + 1 + random.below(3) as usize).min(rows);
                };
                assert_eq!(
                    got, expected,
                    "case {case}: pattern {pattern}, rows {holds:?}, within {within:?}, start {start}"
                );
            }
        }
    }

    #[test]
    fn greedy_and_reluctant_quantifiers_decide_as_the_rules_say() {
        let pattern = Pattern::Concat(vec![
            Pattern::Var(0),
            Pattern::Repeat { inner: Box::new(Pattern::Var(1)), min: 1, max: None, greedy: false },
            Pattern::Var(2),
        ]);
        let program = Program::compile(&pattern).unwrap();
        // A B+? C over rows where B and C both hold from row 1: the reluctant B+ stops as soon as C can follow.
        let holds = [[true, false, false], [false, true, true], [false, true, true], [false, true, true]];
        let mut accepts = |variable: usize, row: usize, _: MatchedRows<'_>| holds[row][variable];
        let matched = program.match_at(holds.len(), 0, &mut accepts).unwrap().unwrap();
        assert_eq!(matched.iter().map(|c| c.variable).collect::<Vec<_>>(), [0, 1, 2]);
    }

    /// `(A B | A C)+ D` over rows alternating A and B, then D: at every A both alternatives take the row and the
    /// second dies at the next, leaving its row behind in the trail. Compaction keeps the trail within twice the rows
    /// the live threads hold (plus its minimum), and the match is every row.
    #[test]
    fn a_long_attempt_keeps_the_rows_of_its_live_threads_only() {
        let (a, b, c, d) = (Pattern::Var(0), Pattern::Var(1), Pattern::Var(2), Pattern::Var(3));
        let pattern = Pattern::Concat(vec![
            Pattern::Repeat {
                inner: Box::new(Pattern::Alt(vec![Pattern::Concat(vec![a.clone(), b]), Pattern::Concat(vec![a, c])])),
                min: 1,
                max: None,
                greedy: true,
            },
            d,
        ]);
        let program = Program::compile(&pattern).unwrap();
        let rows = 20_001;
        // A on even rows, B on odd ones (C never), D on the last.
        let mut accepts = |variable: usize, row: usize, _: MatchedRows<'_>| match variable {
            3 => row == rows - 1,
            2 => false,
            v => row < rows - 1 && row % 2 == v,
        };
        let mut attempt = program.begin(0, 0, false).unwrap();
        let mut compacted = false;
        for known in (100..rows).step_by(100) {
            assert_eq!(program.advance(&mut attempt, known, false, &mut accepts).unwrap(), None);
            // The live threads hold `known` rows (or one fewer, between an A and its B).
            let steps = attempt.trail.steps.len();
            assert!(steps <= 2 * known + COMPACT_MIN, "{steps} rows kept after {known}");
            compacted |= steps < known + known / 2;
        }
        assert!(compacted, "without compaction the trail holds one and a half rows a row");
        let matched = program.advance(&mut attempt, rows, true, &mut accepts).unwrap().unwrap().unwrap();
        let variables: Vec<usize> = matched.iter().map(|c| c.variable).collect();
        let expected: Vec<usize> = (0..rows).map(|r| if r == rows - 1 { 3 } else { r % 2 }).collect();
        assert_eq!(variables, expected);
        assert_eq!(matched.iter().map(|c| c.row).collect::<Vec<_>>(), (0..rows).collect::<Vec<_>>());
    }

    #[test]
    fn huge_quantifiers_are_refused() {
        let pattern = Pattern::Repeat { inner: Box::new(Pattern::Var(0)), min: 0, max: Some(1_000_000), greedy: true };
        assert_eq!(Program::compile(&pattern).unwrap_err(), PatternError::TooLarge);
    }
}
