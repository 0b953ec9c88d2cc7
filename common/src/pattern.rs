//! Row patterns of `MATCH_RECOGNIZE` (SQL:2016, part 5), as the planner compiles them and the runtime matches them.
//!
//! A [`Pattern`] is a regular expression over pattern variables (by index into the `DEFINE` list). Alternatives are
//! preferred left to right; a greedy quantifier prefers more iterations, a reluctant one fewer; `PERMUTE(A, B)` is the
//! alternation of every order of its arguments, in lexicographic order of their positions; an iteration of a quantified
//! part that matches no row ends the repetition. [`Pattern::reference_match`] is the obviously-correct backtracking
//! matcher these rules define, against which faster matchers are tested.

use std::fmt;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;

/// A row pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// One row classified as the variable with this index.
    Var(usize),
    /// `^`: the start of the partition (matches no row).
    Start,
    /// `$`: the end of the partition (matches no row).
    End,
    /// Each part in turn.
    Concat(Vec<Pattern>),
    /// The first part that leads to a match, in order.
    Alt(Vec<Pattern>),
    /// `inner` from `min` to `max` (unbounded: `None`) times; greedy prefers more.
    Repeat { inner: Box<Pattern>, min: u32, max: Option<u32>, greedy: bool },
    /// `{- inner -}`: matched, but its rows are left out of `ALL ROWS PER MATCH`.
    Exclude(Box<Pattern>),
}

impl Pattern {
    /// `PERMUTE(parts)`: every order of the parts, preferred in lexicographic order of their positions.
    pub fn permute(parts: Vec<Pattern>) -> Pattern {
        fn orders(indexes: &[usize]) -> Vec<Vec<usize>> {
            if indexes.len() <= 1 {
                return vec![indexes.to_vec()];
            }
            let mut all = Vec::new();
            for (n, first) in indexes.iter().enumerate() {
                let rest: Vec<usize> = indexes.iter().enumerate().filter(|(m, _)| *m != n).map(|(_, i)| *i).collect();
                for mut order in orders(&rest) {
                    order.insert(0, *first);
                    all.push(order);
                }
            }
            all
        }
        let indexes: Vec<usize> = (0..parts.len()).collect();
        let alternatives = orders(&indexes)
            .into_iter()
            .map(|order| Pattern::Concat(order.iter().map(|i| parts[*i].clone()).collect()));
        Pattern::Alt(alternatives.collect())
    }

    /// Whether the pattern can only ever match no rows (`()`, `A{0}`, `^`): such a pattern is refused.
    pub fn matches_only_empty(&self) -> bool {
        match self {
            Pattern::Var(_) => false,
            Pattern::Start | Pattern::End => true,
            Pattern::Concat(parts) | Pattern::Alt(parts) => parts.iter().all(Pattern::matches_only_empty),
            Pattern::Repeat { inner, max, .. } => *max == Some(0) || inner.matches_only_empty(),
            Pattern::Exclude(inner) => inner.matches_only_empty(),
        }
    }

    /// The variables the pattern names, each once, in order of first appearance.
    pub fn variables(&self) -> Vec<usize> {
        fn collect(pattern: &Pattern, out: &mut Vec<usize>) {
            match pattern {
                Pattern::Var(v) if !out.contains(v) => out.push(*v),
                Pattern::Var(_) | Pattern::Start | Pattern::End => {}
                Pattern::Concat(parts) | Pattern::Alt(parts) => parts.iter().for_each(|p| collect(p, out)),
                Pattern::Repeat { inner, .. } | Pattern::Exclude(inner) => collect(inner, out),
            }
        }
        let mut out = Vec::new();
        collect(self, &mut out);
        out
    }

    /// The preferred match starting at row `start` of a partition of `rows` rows, by backtracking in preference
    /// order: `accepts(variable, row, matched_so_far)` says whether `row` may be classified as `variable` after the
    /// rows matched so far (`DEFINE`'s condition, which may look at them). Returns each matched row's variable and
    /// whether it is excluded, in row order; `Some(empty)` is an empty match, `None` no match.
    pub fn reference_match(
        &self,
        rows: usize,
        start: usize,
        accepts: &mut dyn FnMut(usize, usize, &[Classified]) -> bool,
    ) -> Option<Vec<Classified>> {
        let mut matched = Vec::new();
        let mut search = Search { rows, accepts, excluded: 0 };
        let mut found = None;
        search.step(&[Frame::Node(self)], start, &mut matched, &mut |matched| {
            found = Some(matched.to_vec());
            true
        });
        found
    }
}

/// An expression of `DEFINE` or `MEASURES`.
#[derive(Debug, Clone, PartialEq)]
pub enum MatchExpr {
    Literal(ScalarValue),
    /// A column of the current row, or (with a variable) of that variable's last row. Variables are numbered as the
    /// pattern's, then the `SUBSET`s.
    Column {
        variable: Option<usize>,
        column: usize,
    },
    Binary {
        left: Box<MatchExpr>,
        op: BinaryOp,
        right: Box<MatchExpr>,
    },
    Not(Box<MatchExpr>),
    Negate(Box<MatchExpr>),
    IsNull {
        expr: Box<MatchExpr>,
        negated: bool,
    },
    /// `PREV(expr, n)` / `NEXT(expr, n)`: `expr` at the row `offset` rows before (negative: after) the current one.
    Shift {
        expr: Box<MatchExpr>,
        offset: i64,
    },
    /// `FIRST(v.col, n)` / `LAST(v.col, n)`: the column at the `n`-th row of the variable (all rows without one) from
    /// the start or the end of the match.
    Navigate {
        variable: Option<usize>,
        column: usize,
        from_end: bool,
        offset: usize,
    },
    /// An aggregate over the rows of a variable (all rows without one); `column` none counts rows.
    Aggregate {
        function: Aggregate,
        variable: Option<usize>,
        column: Option<usize>,
    },
    MatchNumber,
    Classifier,
    /// `FINAL f(...)`: over the whole match, even in a row of `ALL ROWS PER MATCH` before its last.
    Final(Box<MatchExpr>),
}

impl MatchExpr {
    /// The type of the expression's values over rows of `input`: what a measure's column is declared as, whatever
    /// rows it meets (a measure that is NULL on every match still has its type).
    pub fn data_type(&self, input: &Schema) -> DataType {
        let column = |c: &usize| input.fields().get(*c).map(|f| f.data_type().clone()).unwrap_or(DataType::Null);
        match self {
            MatchExpr::Literal(value) => value.data_type(),
            MatchExpr::Column { column: c, .. } | MatchExpr::Navigate { column: c, .. } => column(c),
            MatchExpr::Shift { expr, .. } | MatchExpr::Negate(expr) | MatchExpr::Final(expr) => expr.data_type(input),
            MatchExpr::Not(_) | MatchExpr::IsNull { .. } => DataType::Boolean,
            MatchExpr::Binary { left, op, right } => match op {
                BinaryOp::Plus | BinaryOp::Minus | BinaryOp::Multiply | BinaryOp::Divide => {
                    common_type(&left.data_type(input), &right.data_type(input))
                }
                _ => DataType::Boolean,
            },
            MatchExpr::Aggregate { function, column: c, .. } => match (function, c) {
                (Aggregate::Count, _) | (_, None) => DataType::Int64,
                (Aggregate::Avg, _) => DataType::Float64,
                (_, Some(c)) => column(c),
            },
            MatchExpr::MatchNumber => DataType::Int64,
            MatchExpr::Classifier => DataType::Utf8,
        }
    }

    /// The most rows before the current one the expression looks at (`PREV(x, 2)`: 2): what matching on a stream
    /// keeps of the rows before a match.
    pub fn lookback(&self) -> usize {
        self.shifts().0
    }

    /// The most rows after the current one the expression looks at (`NEXT(x, 2)`: 2): how many rows matching on a
    /// stream waits for before it tries a row.
    pub fn lookahead(&self) -> usize {
        self.shifts().1
    }

    /// Whether the expression is the time of one of the match's rows: `FIRST`/`LAST` (possibly `FINAL`) of the
    /// event-time column `time` (what `MATCH_ROWTIME()` is).
    pub fn is_row_time(&self, time: usize) -> bool {
        match self {
            MatchExpr::Navigate { column, .. } => *column == time,
            MatchExpr::Final(inner) => inner.is_row_time(time),
            _ => false,
        }
    }

    /// Whether the expression has an aggregate part.
    pub fn has_aggregate(&self) -> bool {
        match self {
            MatchExpr::Aggregate { .. } => true,
            MatchExpr::Binary { left, right, .. } => left.has_aggregate() || right.has_aggregate(),
            MatchExpr::Not(inner)
            | MatchExpr::Negate(inner)
            | MatchExpr::IsNull { expr: inner, .. }
            | MatchExpr::Shift { expr: inner, .. }
            | MatchExpr::Final(inner) => inner.has_aggregate(),
            _ => false,
        }
    }

    /// Whether the expression has a `FINAL` part.
    pub fn uses_final(&self) -> bool {
        match self {
            MatchExpr::Final(_) => true,
            MatchExpr::Binary { left, right, .. } => left.uses_final() || right.uses_final(),
            MatchExpr::Not(inner)
            | MatchExpr::Negate(inner)
            | MatchExpr::IsNull { expr: inner, .. }
            | MatchExpr::Shift { expr: inner, .. } => inner.uses_final(),
            _ => false,
        }
    }

    /// The largest backward and forward shifts.
    fn shifts(&self) -> (usize, usize) {
        match self {
            MatchExpr::Shift { expr, offset } => {
                // The inner expression looks from `ahead` rows after to `back` rows before; this shifts that by
                // `offset` rows back.
                let (back, ahead) = expr.shifts();
                let back = (*offset + back as i64).max(0) as usize;
                let ahead = (ahead as i64 - *offset).max(0) as usize;
                (back, ahead)
            }
            MatchExpr::Binary { left, right, .. } => {
                let (l, r) = (left.shifts(), right.shifts());
                (l.0.max(r.0), l.1.max(r.1))
            }
            MatchExpr::Not(inner)
            | MatchExpr::Negate(inner)
            | MatchExpr::IsNull { expr: inner, .. }
            | MatchExpr::Final(inner) => inner.shifts(),
            _ => (0, 0),
        }
    }
}

/// The type two operands of arithmetic are brought to, as matching evaluates them: equal types stay, integers widen
/// to `Int64`, other numbers to `Float64`, strings to `Utf8`; otherwise a timestamp's type, else the right one's.
pub fn common_type(left: &DataType, right: &DataType) -> DataType {
    if left == right {
        left.clone()
    } else if left.is_integer() && right.is_integer() {
        DataType::Int64
    } else if left.is_numeric() && right.is_numeric() {
        DataType::Float64
    } else if matches!(left, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        && matches!(right, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
    {
        DataType::Utf8
    } else if matches!(left, DataType::Timestamp(..)) {
        left.clone()
    } else {
        right.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Plus,
    Minus,
    Multiply,
    Divide,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Count,
    Avg,
    Min,
    Max,
}

/// Where to start looking for the next match after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipTo {
    PastLastRow,
    NextRow,
    /// The first / last row of a variable in the match.
    First(usize),
    Last(usize),
}

/// A compiled `MATCH_RECOGNIZE`: columns by position in its input.
#[derive(Debug, Clone)]
pub struct MatchRecognize {
    pub partition_by: Vec<usize>,
    /// Columns and whether each is descending.
    pub order_by: Vec<(usize, bool)>,
    pub pattern: Pattern,
    pub variables: Vec<String>,
    /// Per variable, its condition; none means every row qualifies.
    pub defines: Vec<Option<MatchExpr>>,
    pub measures: Vec<(String, MatchExpr)>,
    pub skip: SkipTo,
    /// `WITHIN`: every row of a match lies less than this many units (of the first `ORDER BY` column, a timestamp)
    /// after the match's first row, as in Flink.
    pub within: Option<i64>,
    /// `WITHIN ... EMIT TIMEOUTS`: a match attempt that `WITHIN` cut off, leaving no match, is an output row too, its
    /// measures over the partial match, with [`TIMED_OUT`] true.
    pub emit_timeouts: bool,
    pub rows_per_match: RowsPerMatch,
    /// `SUBSET`s, numbered after the pattern's variables: the variables each unites.
    pub subsets: Vec<Vec<usize>>,
}

/// The column `EMIT TIMEOUTS` adds after the measures: whether the row is a partial match `WITHIN` cut off.
pub const TIMED_OUT: &str = "timed_out";

/// `ONE ROW PER MATCH` (measures over the whole match) or `ALL ROWS PER MATCH` (each matched row, measures over the
/// match up to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsPerMatch {
    One,
    All {
        /// `SHOW EMPTY MATCHES` (the default): an empty match is a row (its start row, measures over no rows);
        /// `OMIT EMPTY MATCHES`: nothing.
        show_empty: bool,
        /// `WITH UNMATCHED ROWS`: every row no match covers is a row too, with NULL measures.
        unmatched: bool,
    },
}

/// A matched row: its index, its variable, and whether it was inside `{- -}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub row: usize,
    pub variable: usize,
    pub excluded: bool,
}

/// What remains to match: a continuation stack, innermost first.
#[derive(Clone, Copy)]
enum Frame<'p> {
    Node(&'p Pattern),
    /// Iteration `done` of a repetition, begun at row `from` (an iteration that matched no row ends it).
    Repeat {
        pattern: &'p Pattern,
        done: u32,
        from: usize,
    },
    /// Leaves an exclusion.
    EndExclude,
}

struct Search<'a> {
    rows: usize,
    accepts: &'a mut dyn FnMut(usize, usize, &[Classified]) -> bool,
    /// How many exclusions the search is inside.
    excluded: u32,
}

impl Search<'_> {
    /// Matches `frames` (the first first) from row `at`; calls `done` at each complete match in preference order
    /// until it returns `true`. Returns whether it did.
    fn step(
        &mut self,
        frames: &[Frame<'_>],
        at: usize,
        matched: &mut Vec<Classified>,
        done: &mut dyn FnMut(&[Classified]) -> bool,
    ) -> bool {
        let Some((first, rest)) = frames.split_first() else { return done(matched) };
        match *first {
            Frame::EndExclude => {
                self.excluded -= 1;
                let found = self.step(rest, at, matched, done);
                self.excluded += 1;
                found
            }
            Frame::Node(Pattern::Var(variable)) => {
                if at >= self.rows || !(self.accepts)(*variable, at, matched) {
                    return false;
                }
                matched.push(Classified { row: at, variable: *variable, excluded: self.excluded > 0 });
                let found = self.step(rest, at + 1, matched, done);
                matched.pop();
                found
            }
            Frame::Node(Pattern::Start) => at == 0 && self.step(rest, at, matched, done),
            Frame::Node(Pattern::End) => at == self.rows && self.step(rest, at, matched, done),
            Frame::Node(Pattern::Concat(parts)) => {
                let mut next: Vec<Frame<'_>> = parts.iter().map(Frame::Node).collect();
                next.extend_from_slice(rest);
                self.step(&next, at, matched, done)
            }
            Frame::Node(Pattern::Alt(parts)) => parts.iter().any(|part| {
                let mut next = vec![Frame::Node(part)];
                next.extend_from_slice(rest);
                self.step(&next, at, matched, done)
            }),
            Frame::Node(Pattern::Exclude(inner)) => {
                self.excluded += 1;
                let mut next = vec![Frame::Node(inner), Frame::EndExclude];
                next.extend_from_slice(rest);
                let found = self.step(&next, at, matched, done);
                self.excluded -= 1;
                found
            }
            Frame::Node(pattern @ Pattern::Repeat { .. }) => self.repeat(pattern, 0, at, rest, matched, done),
            Frame::Repeat { pattern, done: count, from } => {
                // An iteration that matched no row ends the repetition: another would match no row again (nothing
                // it could look at has changed), so the iterations still required are met and more would loop.
                if at == from {
                    return self.step(rest, at, matched, done);
                }
                self.repeat(pattern, count, at, rest, matched, done)
            }
        }
    }

    /// After `count` iterations of `pattern` (a repetition), at row `at`: one more, or on to `rest`, in the order the
    /// quantifier prefers.
    fn repeat(
        &mut self,
        pattern: &Pattern,
        count: u32,
        at: usize,
        rest: &[Frame<'_>],
        matched: &mut Vec<Classified>,
        done: &mut dyn FnMut(&[Classified]) -> bool,
    ) -> bool {
        let Pattern::Repeat { inner, min, max, greedy } = pattern else { return false };
        let again = |search: &mut Self, matched: &mut Vec<Classified>, done: &mut dyn FnMut(&[Classified]) -> bool| {
            if max.is_some_and(|max| count >= max) {
                return false;
            }
            let mut next = vec![Frame::Node(inner.as_ref()), Frame::Repeat { pattern, done: count + 1, from: at }];
            next.extend_from_slice(rest);
            search.step(&next, at, matched, done)
        };
        let stop = |search: &mut Self, matched: &mut Vec<Classified>, done: &mut dyn FnMut(&[Classified]) -> bool| {
            count >= *min && search.step(rest, at, matched, done)
        };
        match greedy {
            true => again(self, matched, done) || stop(self, matched, done),
            false => stop(self, matched, done) || again(self, matched, done),
        }
    }
}

impl Pattern {
    /// The pattern in `PATTERN (...)` syntax, with the variables' names (by number).
    pub fn render(&self, names: &[String]) -> String {
        let name = |v: usize| names.get(v).cloned().unwrap_or_else(|| format!("v{v}"));
        self.render_with(&name)
    }

    fn render_with(&self, name: &dyn Fn(usize) -> String) -> String {
        let join = |parts: &[Pattern], separator: &str| {
            parts.iter().map(|p| p.render_with(name)).collect::<Vec<_>>().join(separator)
        };
        match self {
            Pattern::Var(v) => name(*v),
            Pattern::Start => "^".to_string(),
            Pattern::End => "$".to_string(),
            Pattern::Concat(parts) => join(parts, " "),
            Pattern::Alt(parts) => format!("({})", join(parts, " | ")),
            Pattern::Repeat { inner, min, max, greedy } => {
                let quantifier = match (min, max) {
                    (0, None) => "*".to_string(),
                    (1, None) => "+".to_string(),
                    (0, Some(1)) => "?".to_string(),
                    (n, Some(m)) if n == m => format!("{{{n}}}"),
                    (n, None) => format!("{{{n},}}"),
                    (n, Some(m)) => format!("{{{n},{m}}}"),
                };
                let lazy = if *greedy { "" } else { "?" };
                let inner_text = inner.render_with(name);
                match inner.as_ref() {
                    Pattern::Var(_) | Pattern::Alt(_) => format!("{inner_text}{quantifier}{lazy}"),
                    _ => format!("({inner_text}){quantifier}{lazy}"),
                }
            }
            Pattern::Exclude(inner) => format!("{{- {} -}}", inner.render_with(name)),
        }
    }
}

impl fmt::Display for Pattern {
    /// The pattern in `PATTERN (...)` syntax, variables as `v0`, `v1`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render_with(&|v| format!("v{v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;

    fn var(v: usize) -> Pattern {
        Pattern::Var(v)
    }

    fn repeat(inner: Pattern, min: u32, max: Option<u32>, greedy: bool) -> Pattern {
        Pattern::Repeat { inner: Box::new(inner), min, max, greedy }
    }

    /// Matches over rows given as the set of variables each row satisfies (`"ab"`: A and B), from row 0; returns
    /// the variables of the matched rows as letters (excluded ones upper-case).
    fn run(pattern: &Pattern, rows: &[&str]) -> Option<String> {
        let mut accepts =
            |variable: usize, row: usize, _: &[Classified]| rows[row].contains((b'a' + variable as u8) as char);
        pattern.reference_match(rows.len(), 0, &mut accepts).map(|matched| {
            matched
                .iter()
                .map(|c| {
                    let letter = (b'a' + c.variable as u8) as char;
                    if c.excluded { letter.to_ascii_uppercase() } else { letter }
                })
                .collect()
        })
    }

    #[test]
    fn greedy_takes_the_most_and_reluctant_the_fewest() {
        let rows = ["ab", "ab", "ab", "b"];
        // A* B: A takes all it can, then B.
        let greedy = Pattern::Concat(vec![repeat(var(A), 0, None, true), var(B)]);
        assert_eq!(run(&greedy, &rows).as_deref(), Some("aaab"));
        // A*? B: A takes nothing; B matches the first row.
        let reluctant = Pattern::Concat(vec![repeat(var(A), 0, None, false), var(B)]);
        assert_eq!(run(&reluctant, &rows).as_deref(), Some("b"));
        // A{2,}? B: at least two.
        let two = Pattern::Concat(vec![repeat(var(A), 2, None, false), var(B)]);
        assert_eq!(run(&two, &rows).as_deref(), Some("aab"));
        // Greedy backs off when the rest cannot match: A+ B over a b b.
        assert_eq!(
            run(&Pattern::Concat(vec![repeat(var(A), 1, None, true), var(B)]), &["ab", "ab"]).as_deref(),
            Some("ab")
        );
    }

    #[test]
    fn alternation_prefers_the_left_even_when_the_right_is_longer() {
        let rows = ["ab", "b", "c"];
        let pattern = Pattern::Concat(vec![
            Pattern::Alt(vec![var(A), Pattern::Concat(vec![var(B), var(B)])]),
            repeat(var(B), 0, None, true),
        ]);
        // (A | B B) B*: A is preferred at row 0; then B* takes row 1.
        assert_eq!(run(&pattern, &rows).as_deref(), Some("ab"));
        let pattern = Pattern::Concat(vec![Pattern::Alt(vec![var(A), var(B)]), var(C)]);
        // (A | B) C over [a, c]... row 0 satisfies only A here: falls to the only alternative that works.
        assert_eq!(run(&pattern, &["b", "c"]).as_deref(), Some("bc"));
    }

    #[test]
    fn permute_prefers_the_written_order_and_tries_the_others() {
        let pattern = Pattern::permute(vec![var(A), var(B), var(C)]);
        assert_eq!(run(&pattern, &["abc", "abc", "abc"]).as_deref(), Some("abc"));
        assert_eq!(run(&pattern, &["c", "a", "b"]).as_deref(), Some("cab"));
        assert_eq!(run(&pattern, &["c", "c", "b"]), None);
        assert_eq!(pattern.to_string(), "(v0 v1 v2 | v0 v2 v1 | v1 v0 v2 | v1 v2 v0 | v2 v0 v1 | v2 v1 v0)");
    }

    #[test]
    fn exclusion_anchors_and_empty_matches() {
        let pattern = Pattern::Concat(vec![var(A), Pattern::Exclude(Box::new(repeat(var(B), 1, None, true))), var(C)]);
        assert_eq!(run(&pattern, &["a", "b", "b", "c"]).as_deref(), Some("aBBc"));
        // ^ A: only at the start of the partition.
        let anchored = Pattern::Concat(vec![Pattern::Start, var(A)]);
        assert_eq!(run(&anchored, &["a"]).as_deref(), Some("a"));
        let mut never = |_: usize, _: usize, _: &[Classified]| true;
        assert_eq!(anchored.reference_match(2, 1, &mut never), None);
        // A $: only at the end.
        let ending = Pattern::Concat(vec![var(A), Pattern::End]);
        assert_eq!(run(&ending, &["a", "a"]), None);
        assert_eq!(run(&ending, &["a"]).as_deref(), Some("a"));
        // A* matches empty where A does not hold; (A*)* does not loop for ever.
        assert_eq!(run(&repeat(var(A), 0, None, true), &["b"]).as_deref(), Some(""));
        let nested = repeat(repeat(var(A), 0, None, true), 0, None, true);
        assert_eq!(run(&nested, &["a", "a", "b"]).as_deref(), Some("aa"));
        assert!(Pattern::Concat(vec![Pattern::Start, repeat(var(A), 0, Some(0), true)]).matches_only_empty());
        assert!(!nested.matches_only_empty());
    }

    #[test]
    fn conditions_see_the_rows_matched_so_far() {
        // A B+ where each B must be greater than the row before it: a rising run.
        let values = [5, 1, 2, 3, 2];
        let pattern = Pattern::Concat(vec![var(A), repeat(var(B), 1, None, true)]);
        let mut rising = |variable: usize, row: usize, matched: &[Classified]| match variable {
            A => true,
            _ => matched.last().is_some_and(|last| values[row] > values[last.row]),
        };
        let from_one = pattern.reference_match(values.len(), 1, &mut rising).unwrap();
        assert_eq!(from_one.iter().map(|c| c.row).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(pattern.reference_match(values.len(), 0, &mut rising), None);
    }
}
