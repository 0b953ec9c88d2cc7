//! The `PATTERN (...)` of `MATCH_RECOGNIZE`, parsed by Weir: sqlparser does not know reluctant quantifiers (`*?`, `+?`,
//! `??`, `{n,m}?`).
//!
//! ```text
//! pattern     := alternative ('|' alternative)*
//! alternative := term*                                   -- an empty alternative matches no row
//! term        := primary quantifier?
//! primary     := variable | '^' | '$' | '(' pattern ')' | '{-' pattern '-}' | PERMUTE '(' pattern (',' pattern)* ')'
//! quantifier  := ('*' | '+' | '?' | '{' n '}' | '{' n ',' '}' | '{' ',' m '}' | '{' n ',' m '}') '?'?
//! ```
//!
//! Variables are identifiers (case-insensitive unless double-quoted), numbered in order of first appearance.

use std::cell::RefCell;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan};
use weir_common::pattern::{Aggregate, BinaryOp, MatchExpr, MatchRecognize, Pattern, RowsPerMatch, SkipTo, TIMED_OUT};
use weir_common::{ErrorReport, SqlState};

use crate::parse::ParseError;

/// A parsed `PATTERN`: the pattern over variable numbers, and the variables' names by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPattern {
    pub pattern: Pattern,
    pub variables: Vec<String>,
}

/// One `MATCH_RECOGNIZE`'s pattern, time bound and subsets, taken out of the statement before sqlparser parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPatternClause {
    /// The name that stands for the pattern in the statement sqlparser parses: `PATTERN (__weir_pattern_N)`.
    pub placeholder: String,
    pub pattern: RowPattern,
    /// The `WITHIN` bound as written (`INTERVAL '10' MINUTE`).
    pub within: Option<String>,
    /// `WITHIN ... EMIT TIMEOUTS` (Weir's): partial matches `WITHIN` cuts off are output rows too.
    pub emit_timeouts: bool,
    /// `SUBSET name = (variable, ...)`, names normalized.
    pub subsets: Vec<(String, Vec<String>)>,
    /// Where `PATTERN` starts in the query string.
    pub location: Location,
}

impl RowPatternClause {
    /// The 1-based character position of the clause's `PATTERN` in the query string `sql`: where an error about the
    /// clause that has no better place points.
    pub fn position(&self, sql: &str) -> Option<usize> {
        crate::parse::char_offset(sql, self.location).map(|p| p + 1)
    }
}

/// Takes the body of every `PATTERN (...)` of a `MATCH_RECOGNIZE` out of `tokens`, parsed by Weir, leaving a
/// placeholder variable sqlparser accepts, and the `WITHIN interval` after it (which sqlparser does not know).
pub(crate) fn extract_row_patterns(
    sql: &str,
    tokens: Vec<TokenWithSpan>,
) -> Result<(Vec<TokenWithSpan>, Vec<RowPatternClause>), ParseError> {
    let is_word = |token: &Token, word: &str| matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word));
    let significant = |tokens: &[TokenWithSpan], from: usize| {
        (from..tokens.len()).find(|&i| !matches!(tokens[i].token, Token::Whitespace(_)))
    };
    let mut tokens = tokens;
    let mut clauses = Vec::new();
    let mut inside_match_recognize = false;
    let mut i = 0;
    while i < tokens.len() {
        if is_word(&tokens[i].token, "MATCH_RECOGNIZE") {
            inside_match_recognize = true;
        }
        // Looked at only after `PATTERN`: looking ahead at every token is quadratic in a run of whitespace.
        let at_pattern = inside_match_recognize && is_word(&tokens[i].token, "PATTERN");
        let Some(opening) = at_pattern.then(|| significant(&tokens, i + 1)).flatten() else {
            i += 1;
            continue;
        };
        if tokens[opening].token != Token::LParen {
            i += 1;
            continue;
        }
        inside_match_recognize = false;
        // The parenthesis that closes the pattern, before the clauses that follow it.
        let mut depth = 0;
        let closing = (opening..tokens.len()).find(|&j| {
            match &tokens[j].token {
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                token if ["WITHIN", "SUBSET", "DEFINE"].iter().any(|w| is_word(token, w)) => return true,
                _ => {}
            }
            depth == 0
        });
        let Some(closing) = closing.filter(|&j| tokens[j].token == Token::RParen) else {
            let message = "the parentheses of the row pattern do not match";
            return Err(syntax_error(sql, tokens[opening].span.start, message));
        };
        let text = crate::parse::slice(sql, tokens[opening].span.end, tokens[closing].span.start);
        let pattern = parse_row_pattern(text).map_err(|err| {
            let start = crate::parse::char_offset(sql, tokens[opening].span.end).unwrap_or(0);
            let offset = text[..err.offset.min(text.len())].chars().count();
            ParseError {
                code: SqlState::SYNTAX_ERROR,
                message: format!("syntax error in the row pattern: {}", err.message),
                detail: None,
                position: Some(start + offset + 1),
            }
        })?;
        if pattern.pattern.matches_only_empty() {
            return Err(syntax_error(
                sql,
                tokens[opening].span.end,
                "the row pattern can only match empty input; it needs at least one pattern variable",
            ));
        }
        let placeholder = format!("__weir_pattern_{}", clauses.len());
        let span = Span::new(tokens[opening].span.end, tokens[closing].span.start);
        // `WITHIN interval` runs up to `SUBSET` or `DEFINE`.
        let mut within = None;
        let mut emit_timeouts = false;
        let mut end = closing + 1;
        if let Some(word) = significant(&tokens, closing + 1).filter(|&w| is_word(&tokens[w].token, "WITHIN")) {
            let Some(stop) = (word + 1..tokens.len())
                .find(|&j| is_word(&tokens[j].token, "DEFINE") || is_word(&tokens[j].token, "SUBSET"))
            else {
                return Err(syntax_error(sql, tokens[word].span.end, "WITHIN must be followed by SUBSET or DEFINE"));
            };
            let mut bound = crate::parse::slice(sql, tokens[word].span.end, tokens[stop].span.start).trim().to_string();
            let words: Vec<&str> = bound.split_whitespace().collect();
            if let [.., emit, timeouts] = words.as_slice()
                && emit.eq_ignore_ascii_case("EMIT")
                && timeouts.eq_ignore_ascii_case("TIMEOUTS")
            {
                emit_timeouts = true;
                bound = words[..words.len() - 2].join(" ");
            }
            if bound.is_empty() {
                return Err(syntax_error(sql, tokens[word].span.end, "WITHIN needs an interval"));
            }
            within = Some(bound);
            end = stop;
        }
        // `SUBSET u = (a, b), ...` runs up to `DEFINE`.
        let mut subsets = Vec::new();
        if let Some(word) = significant(&tokens, end).filter(|&w| is_word(&tokens[w].token, "SUBSET")) {
            let Some(stop) = (word + 1..tokens.len()).find(|&j| is_word(&tokens[j].token, "DEFINE")) else {
                return Err(syntax_error(sql, tokens[word].span.end, "SUBSET must be followed by DEFINE"));
            };
            let text = crate::parse::slice(sql, tokens[word].span.end, tokens[stop].span.start);
            subsets = parse_subsets(text)
                .ok_or_else(|| syntax_error(sql, tokens[word].span.end, "expected SUBSET name = (variable, ...)"))?;
            end = stop;
        }
        clauses.push(RowPatternClause {
            placeholder: placeholder.clone(),
            pattern,
            within,
            emit_timeouts,
            subsets,
            location: tokens[i].span.start,
        });
        let replacement = [
            TokenWithSpan::new(Token::LParen, tokens[opening].span),
            TokenWithSpan::new(Token::make_word(&placeholder, None), span),
            TokenWithSpan::new(Token::RParen, tokens[closing].span),
            TokenWithSpan::new(Token::Whitespace(datafusion::sql::sqlparser::tokenizer::Whitespace::Space), span),
        ];
        tokens.splice(opening..end, replacement);
        i = opening + 4;
    }
    if !clauses.is_empty() {
        mark_semantics(&mut tokens);
    }
    Ok((tokens, clauses))
}

/// The prefix that marks a function call written after `FINAL` (`FINAL LAST(x)` reaches sqlparser as
/// `weir_final_last(x)`); `RUNNING`, the default, is dropped.
const FINAL_PREFIX: &str = "WEIR_FINAL_";

/// `text` (an expression as sqlparser prints it) with its `FINAL` marks written as `FINAL` again.
pub fn unmark_semantics(text: &str) -> String {
    text.replace(FINAL_PREFIX, "FINAL ")
}

/// Takes `RUNNING` and `FINAL` (which sqlparser does not know) off the function calls they qualify in a statement
/// with `MATCH_RECOGNIZE`, marking the calls `FINAL` qualifies.
fn mark_semantics(tokens: &mut [TokenWithSpan]) {
    let word = |token: &Token| match token {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_uppercase()),
        _ => None,
    };
    let next = |tokens: &[TokenWithSpan], from: usize| {
        (from..tokens.len()).find(|&i| !matches!(tokens[i].token, Token::Whitespace(_)))
    };
    for i in 0..tokens.len() {
        let Some(qualifier) = word(&tokens[i].token).filter(|w| w == "RUNNING" || w == "FINAL") else { continue };
        let Some(function) = next(tokens, i + 1) else { continue };
        let Some(name) = word(&tokens[function].token) else { continue };
        if next(tokens, function + 1).is_none_or(|open| tokens[open].token != Token::LParen) {
            continue;
        }
        tokens[i].token = Token::Whitespace(datafusion::sql::sqlparser::tokenizer::Whitespace::Space);
        if qualifier == "FINAL" {
            tokens[function].token = Token::make_word(&format!("{FINAL_PREFIX}{name}"), None);
        }
    }
}

/// `u = (a, b), v = (c)`; `None` when it is not that shape.
fn parse_subsets(text: &str) -> Option<Vec<(String, Vec<String>)>> {
    let name = |word: &str| {
        let word = word.trim();
        match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
            Some(quoted) => quoted.to_string(),
            None => word.to_lowercase(),
        }
    };
    let mut subsets = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (subset, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('(')?;
        let (members, after) = after.split_once(')')?;
        let members: Vec<String> = members.split(',').map(name).filter(|m| !m.is_empty()).collect();
        if name(subset).is_empty() || members.is_empty() {
            return None;
        }
        subsets.push((name(subset), members));
        rest = after.trim_start();
        rest = rest.strip_prefix(',').map_or(rest, str::trim_start);
    }
    Some(subsets)
}

fn syntax_error(sql: &str, at: Location, message: &str) -> ParseError {
    ParseError {
        code: SqlState::SYNTAX_ERROR,
        message: message.to_string(),
        detail: None,
        position: crate::parse::char_offset(sql, at).map(|p| p + 1),
    }
}

/// A syntax error in a pattern, with the character offset (from 0) in the pattern text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PatternSyntaxError {
    pub message: String,
    pub offset: usize,
}

/// Parses the text inside `PATTERN ( ... )`.
pub fn parse_row_pattern(text: &str) -> Result<RowPattern, PatternSyntaxError> {
    let mut parser = PatternParser { chars: text.char_indices().collect(), at: 0, text, variables: Vec::new() };
    let pattern = parser.alternation()?;
    parser.skip_space();
    if let Some(&(offset, c)) = parser.chars.get(parser.at) {
        return Err(PatternSyntaxError { message: format!("unexpected \"{c}\" in the row pattern"), offset });
    }
    Ok(RowPattern { pattern, variables: parser.variables })
}

struct PatternParser<'t> {
    chars: Vec<(usize, char)>,
    at: usize,
    text: &'t str,
    variables: Vec<String>,
}

impl PatternParser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).map(|(_, c)| *c)
    }

    fn offset(&self) -> usize {
        self.chars.get(self.at).map_or(self.text.len(), |(o, _)| *o)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    /// Consumes `c` after any space.
    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.at += 1;
            return true;
        }
        false
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, PatternSyntaxError> {
        Err(PatternSyntaxError { message: message.into(), offset: self.offset() })
    }

    fn alternation(&mut self) -> Result<Pattern, PatternSyntaxError> {
        let mut alternatives = vec![self.alternative()?];
        while self.eat('|') {
            alternatives.push(self.alternative()?);
        }
        Ok(match alternatives.len() {
            1 => alternatives.remove(0),
            _ => Pattern::Alt(alternatives),
        })
    }

    fn alternative(&mut self) -> Result<Pattern, PatternSyntaxError> {
        let mut terms = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None | Some('|') | Some(')') | Some(',') => break,
                Some('-') if self.chars.get(self.at + 1).map(|(_, c)| *c) == Some('}') => break,
                _ => terms.push(self.term()?),
            }
        }
        Ok(match terms.len() {
            1 => terms.remove(0),
            _ => Pattern::Concat(terms),
        })
    }

    fn term(&mut self) -> Result<Pattern, PatternSyntaxError> {
        let primary = self.primary()?;
        self.skip_space();
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') if self.chars.get(self.at + 1).map(|(_, c)| *c) != Some('-') => {
                return self.braces(primary);
            }
            _ => return Ok(primary),
        };
        self.at += 1;
        let greedy = !self.reluctant();
        Ok(Pattern::Repeat { inner: Box::new(primary), min, max, greedy })
    }

    /// A `?` right after a quantifier makes it reluctant.
    fn reluctant(&mut self) -> bool {
        if self.peek() == Some('?') {
            self.at += 1;
            return true;
        }
        false
    }

    /// `{n}`, `{n,}`, `{,m}`, `{n,m}`, each optionally reluctant.
    fn braces(&mut self, primary: Pattern) -> Result<Pattern, PatternSyntaxError> {
        let opening = self.offset();
        self.at += 1;
        let min = self.number()?;
        let (min, max) = if self.eat(',') {
            let max = self.number()?;
            (min.unwrap_or(0), max)
        } else {
            match min {
                Some(n) => (n, Some(n)),
                None => return self.error("expected a number in the quantifier {n}"),
            }
        };
        if !self.eat('}') {
            return self.error("expected } to end the quantifier");
        }
        if let Some(max) = max.filter(|max| *max < min) {
            return Err(PatternSyntaxError {
                message: format!("the quantifier {{{min},{max}}} allows fewer than its minimum"),
                offset: opening,
            });
        }
        let greedy = !self.reluctant();
        Ok(Pattern::Repeat { inner: Box::new(primary), min, max, greedy })
    }

    fn number(&mut self) -> Result<Option<u32>, PatternSyntaxError> {
        self.skip_space();
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == start {
            return Ok(None);
        }
        let digits: String = self.chars[start..self.at].iter().map(|(_, c)| *c).collect();
        match digits.parse::<u32>() {
            Ok(n) => Ok(Some(n)),
            Err(_) => self.error(format!("the quantifier bound {digits} is too large")),
        }
    }

    fn primary(&mut self) -> Result<Pattern, PatternSyntaxError> {
        self.skip_space();
        match self.peek() {
            Some('^') => {
                self.at += 1;
                Ok(Pattern::Start)
            }
            Some('$') => {
                self.at += 1;
                Ok(Pattern::End)
            }
            Some('(') => {
                self.at += 1;
                let inner = self.alternation()?;
                if !self.eat(')') {
                    return self.error("expected ) to close the group");
                }
                Ok(inner)
            }
            Some('{') => {
                // `{-` (an exclusion); a quantifier cannot start a term.
                if self.chars.get(self.at + 1).map(|(_, c)| *c) != Some('-') {
                    return self.error("a quantifier needs something before it");
                }
                self.at += 2;
                let inner = self.alternation()?;
                self.skip_space();
                if self.peek() != Some('-') || self.chars.get(self.at + 1).map(|(_, c)| *c) != Some('}') {
                    return self.error("expected -} to end the exclusion");
                }
                self.at += 2;
                Ok(Pattern::Exclude(Box::new(inner)))
            }
            Some('"') => {
                self.at += 1;
                let start = self.at;
                while self.peek().is_some_and(|c| c != '"') {
                    self.at += 1;
                }
                if self.peek() != Some('"') {
                    return self.error("unterminated quoted variable name");
                }
                let name: String = self.chars[start..self.at].iter().map(|(_, c)| *c).collect();
                self.at += 1;
                Ok(self.variable(name))
            }
            Some(c) if c.is_alphabetic() || c == '_' => {
                let start = self.at;
                while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    self.at += 1;
                }
                let word: String = self.chars[start..self.at].iter().map(|(_, c)| *c).collect();
                if word.eq_ignore_ascii_case("PERMUTE") && self.eat('(') {
                    let mut parts = vec![self.alternation()?];
                    while self.eat(',') {
                        parts.push(self.alternation()?);
                    }
                    if !self.eat(')') {
                        return self.error("expected ) to end PERMUTE");
                    }
                    return Ok(Pattern::permute(parts));
                }
                Ok(self.variable(word.to_lowercase()))
            }
            Some(c) => self.error(format!("unexpected \"{c}\" in the row pattern")),
            None => self.error("the row pattern ends too early"),
        }
    }

    fn variable(&mut self, name: String) -> Pattern {
        let index = match self.variables.iter().position(|v| *v == name) {
            Some(index) => index,
            None => {
                self.variables.push(name);
                self.variables.len() - 1
            }
        };
        Pattern::Var(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> String {
        let parsed = parse_row_pattern(text).unwrap();
        format!("{} [{}]", parsed.pattern, parsed.variables.join(", "))
    }

    #[test]
    fn quantifiers_greedy_and_reluctant() {
        assert_eq!(parsed("H{3} B"), "v0{3} v1 [h, b]");
        assert_eq!(
            parsed("A B+? C*? D?? E{2,}? F{,4} G{1,3}?"),
            "v0 v1+? v2*? v3?? v4{2,}? v5{0,4} v6{1,3}? [a, b, c, d, e, f, g]"
        );
        assert_eq!(parsed("strt down+ up+"), "v0 v1+ v2+ [strt, down, up]");
    }

    #[test]
    fn groups_alternation_anchors_permute_and_exclusion() {
        assert_eq!(parsed("^ (A | B C)* $"), "^ (v0 | v1 v2)* $ [a, b, c]");
        assert_eq!(parsed("PERMUTE(A, B)"), "(v0 v1 | v1 v0) [a, b]");
        assert_eq!(parsed("A {- B+ -} C"), "v0 {- v1+ -} v2 [a, b, c]");
        assert_eq!(parsed("\"Up\" up"), "v0 v1 [Up, up]");
        assert_eq!(parsed("A ()"), "v0  [a]");
    }

    #[test]
    fn errors_say_where() {
        let err = parse_row_pattern("A (B").unwrap_err();
        assert_eq!((err.message.as_str(), err.offset), ("expected ) to close the group", 4));
        let err = parse_row_pattern("A{3,1}").unwrap_err();
        assert!(err.message.contains("fewer than its minimum"), "{err}");
        assert!(parse_row_pattern("+A").is_err());
        assert!(parse_row_pattern("A {- B").is_err());
        assert!(parse_row_pattern("A B)").is_err());
    }
}

#[cfg(test)]
mod extraction_tests {
    use crate::parse::{WeirStatement, parse_sql};

    const FRAUD: &str = "SELECT * FROM payments MATCH_RECOGNIZE (
  PARTITION BY customer_id ORDER BY ts
  MEASURES FIRST(H.ts) AS first_ts, LAST(H.ts) AS last_ts, SUM(H.amount) AS total,
           B.vendor_id AS new_vendor, MATCH_NUMBER() AS n
  ONE ROW PER MATCH
  AFTER MATCH SKIP PAST LAST ROW
  PATTERN (H{3} B+?) WITHIN INTERVAL '10' MINUTE
  DEFINE H AS H.amount > 500,
         B AS B.vendor_id <> LAST(H.vendor_id)
) AS m";

    #[test]
    fn the_fraud_example_parses_with_its_pattern_and_bound() {
        let parsed = parse_sql(FRAUD).unwrap().remove(0);
        let clause = &parsed.row_patterns[0];
        assert_eq!(clause.pattern.pattern.to_string(), "v0{3} v1+?");
        assert_eq!(clause.pattern.variables, ["h", "b"]);
        assert_eq!(clause.within.as_deref(), Some("INTERVAL '10' MINUTE"));
        let WeirStatement::Sql(statement) = parsed.statement else { panic!("not a query") };
        let text = statement.to_string();
        assert!(text.contains("PATTERN (__weir_pattern_0)"), "{text}");
        assert!(text.contains("DEFINE H AS H.amount > 500"), "{text}");
        // The statement's text is still what the user wrote.
        assert!(parsed.text.contains("B+?) WITHIN INTERVAL '10' MINUTE"));
    }

    #[test]
    fn pattern_errors_point_into_the_pattern() {
        let sql = "SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts PATTERN (A (B) DEFINE A AS true)";
        let err = parse_sql(sql).unwrap_err();
        assert_eq!(err.code, weir_common::SqlState::SYNTAX_ERROR);
        assert_eq!(err.message, "the parentheses of the row pattern do not match");
        assert_eq!(err.position, Some(sql.find("(A (B)").unwrap() + 1));
        let sql = "SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts PATTERN (A B{3,1}) DEFINE A AS true)";
        let err = parse_sql(sql).unwrap_err();
        assert!(err.message.contains("fewer than its minimum"), "{}", err.message);
        // Points at the quantifier's "{" (positions count from 1).
        assert_eq!(err.position, Some(sql.find("{3,1}").unwrap() + 1));
        let err =
            parse_sql("SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts PATTERN (^ $) DEFINE A AS true)").unwrap_err();
        assert!(err.message.contains("only match empty input"), "{}", err.message);
    }
}

/// The parts of a `MATCH_RECOGNIZE` table factor, as sqlparser gives them.
#[derive(Debug, Clone, Copy)]
pub struct MatchRecognizeAst<'a> {
    pub partition_by: &'a [ast::Expr],
    pub order_by: &'a [ast::OrderByExpr],
    pub measures: &'a [ast::Measure],
    pub rows_per_match: Option<&'a ast::RowsPerMatch>,
    pub after_match_skip: Option<&'a ast::AfterMatchSkip>,
    pub symbols: &'a [ast::SymbolDefinition],
}

/// A prepared statement's parameter inside `MATCH_RECOGNIZE` (`$1` is number 1) and the type its use gives it.
pub type PatternParameter = (usize, DataType);

/// Compiles a `MATCH_RECOGNIZE` over an input of `schema` (columns by name) with its pattern `clause`. A parameter
/// (`H.amount > $1`) takes its value from `values` (`$1` first) when they are known, and is NULL otherwise (a
/// prepared statement described before it is bound); each is returned with the type its use gives it.
pub fn compile_match_recognize(
    parts: MatchRecognizeAst<'_>,
    clause: &RowPatternClause,
    schema: &datafusion::arrow::datatypes::Schema,
    values: Option<&[ScalarValue]>,
) -> Result<(MatchRecognize, Vec<PatternParameter>), ErrorReport> {
    let unsupported =
        |what: &str| ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("{what} is not supported yet"));
    let rows_per_match = match parts.rows_per_match {
        None | Some(ast::RowsPerMatch::OneRow) => RowsPerMatch::One,
        Some(ast::RowsPerMatch::AllRows(mode)) => RowsPerMatch::All {
            show_empty: !matches!(mode, Some(ast::EmptyMatchesMode::Omit)),
            unmatched: matches!(mode, Some(ast::EmptyMatchesMode::WithUnmatched)),
        },
    };
    let compiler = ExprCompiler {
        schema,
        variables: &clause.pattern.variables,
        subsets: &clause.subsets,
        values,
        parameters: RefCell::new(Vec::new()),
        time: std::cell::Cell::new(None),
    };
    let variables = &clause.pattern.variables;
    let subsets = clause
        .subsets
        .iter()
        .map(|(subset, members)| {
            let member = |m: &String| {
                variables.iter().position(|v| v == m).ok_or_else(|| {
                    ErrorReport::new(
                        SqlState::UNDEFINED_OBJECT,
                        format!("SUBSET {subset} names \"{m}\", which the PATTERN does not use"),
                    )
                })
            };
            members.iter().map(member).collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let column = |expr: &ast::Expr| match expr {
        ast::Expr::Identifier(ident) => compiler.column(ident),
        other => Err(unsupported(&format!("partitioning or ordering by the expression {other}"))),
    };
    let partition_by = parts.partition_by.iter().map(column).collect::<Result<Vec<_>, _>>()?;
    let order_by = parts
        .order_by
        .iter()
        .map(|o| Ok((column(&o.expr)?, o.options.asc == Some(false))))
        .collect::<Result<Vec<_>, ErrorReport>>()?;
    let time =
        order_by.first().map(|(c, _)| *c).filter(|c| matches!(schema.field(*c).data_type(), DataType::Timestamp(..)));
    compiler.time.set(time);
    let mut defines = vec![None; clause.pattern.variables.len()];
    for symbol in parts.symbols {
        let name = crate::names::normalize_ident(&symbol.symbol);
        let Some(variable) = clause.pattern.variables.iter().position(|v| *v == name) else {
            return Err(ErrorReport::new(
                SqlState::UNDEFINED_OBJECT,
                format!("DEFINE names \"{name}\", which the PATTERN does not use"),
            ));
        };
        let condition = compiler.expr(&symbol.definition)?;
        if condition.uses_final() {
            return Err(ErrorReport::new(
                SqlState::SYNTAX_ERROR,
                format!("FINAL in DEFINE (of \"{name}\"): a condition sees the match only up to the row it tests"),
            ));
        }
        defines[variable] = Some(condition);
    }
    let measures = parts
        .measures
        .iter()
        .map(|m| Ok((crate::names::normalize_ident(&m.alias), compiler.expr(&m.expr)?)))
        .collect::<Result<Vec<_>, ErrorReport>>()?;
    let skip = match parts.after_match_skip {
        None | Some(ast::AfterMatchSkip::PastLastRow) => SkipTo::PastLastRow,
        Some(ast::AfterMatchSkip::ToNextRow) => SkipTo::NextRow,
        Some(ast::AfterMatchSkip::ToFirst(v)) => SkipTo::First(compiler.variable(v)?),
        Some(ast::AfterMatchSkip::ToLast(v)) => SkipTo::Last(compiler.variable(v)?),
    };
    let within = match &clause.within {
        None => None,
        Some(text) => {
            let time = order_by.first().map(|(c, _)| schema.field(*c).data_type());
            let Some(datafusion::arrow::datatypes::DataType::Timestamp(unit, _)) = time else {
                return Err(ErrorReport::new(
                    SqlState::DATATYPE_MISMATCH,
                    "WITHIN needs a timestamp as the first ORDER BY column of MATCH_RECOGNIZE",
                ));
            };
            Some(within_units(text, *unit)?)
        }
    };
    if clause.emit_timeouts {
        if rows_per_match != RowsPerMatch::One {
            return Err(ErrorReport::new(
                SqlState::SYNTAX_ERROR,
                "EMIT TIMEOUTS needs ONE ROW PER MATCH: a timed-out partial match is one row",
            ));
        }
        if measures.iter().any(|(name, _)| name == TIMED_OUT) {
            return Err(ErrorReport::new(
                SqlState::DUPLICATE_COLUMN,
                format!("with EMIT TIMEOUTS the output has a column \"{TIMED_OUT}\"; name the measure otherwise"),
            ));
        }
    }
    let spec = MatchRecognize {
        partition_by,
        order_by,
        pattern: clause.pattern.pattern.clone(),
        variables: clause.pattern.variables.clone(),
        defines,
        measures,
        skip,
        within,
        emit_timeouts: clause.emit_timeouts,
        rows_per_match,
        subsets,
    };
    Ok((spec, compiler.parameters.into_inner()))
}

/// `INTERVAL '10' MINUTE` (or `INTERVAL '10 minutes'`) in units of a timestamp column.
fn within_units(text: &str, unit: datafusion::arrow::datatypes::TimeUnit) -> Result<i64, ErrorReport> {
    use datafusion::arrow::datatypes::TimeUnit;
    let bad = || {
        ErrorReport::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("WITHIN {text}: expected an interval such as INTERVAL '10' MINUTE"),
        )
    };
    let expr = datafusion::sql::sqlparser::parser::Parser::new(&crate::dialect::WEIR)
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|_| bad())?;
    let ast::Expr::Interval(interval) = expr else { return Err(bad()) };
    let ast::Expr::Value(value) = interval.value.as_ref() else { return Err(bad()) };
    let ast::Value::SingleQuotedString(amount) = &value.value else { return Err(bad()) };
    // `'10' MINUTE`, or `'10 minutes'` with the unit inside the string.
    let (number, word) = match &interval.leading_field {
        Some(field) => (amount.trim().to_string(), field.to_string()),
        None => {
            let mut parts = amount.split_whitespace();
            (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or("second").to_string())
        }
    };
    let seconds: f64 = number.parse().map_err(|_| bad())?;
    let per_unit = match word.to_lowercase().trim_end_matches('s') {
        "second" => 1.0,
        "minute" => 60.0,
        "hour" => 3600.0,
        "day" => 86400.0,
        _ => return Err(bad()),
    };
    let scale = match unit {
        TimeUnit::Second => 1.0,
        TimeUnit::Millisecond => 1e3,
        TimeUnit::Microsecond => 1e6,
        TimeUnit::Nanosecond => 1e9,
    };
    Ok((seconds * per_unit * scale) as i64)
}

/// Turns `DEFINE` and `MEASURES` expressions into [`MatchExpr`]s.
struct ExprCompiler<'a> {
    schema: &'a datafusion::arrow::datatypes::Schema,
    variables: &'a [String],
    subsets: &'a [(String, Vec<String>)],
    /// The parameters' values, when bound.
    values: Option<&'a [ScalarValue]>,
    /// The parameters met, with their types.
    parameters: RefCell<Vec<PatternParameter>>,
    /// The event-time column (the first `ORDER BY` column, a timestamp), once known.
    time: std::cell::Cell<Option<usize>>,
}

impl ExprCompiler<'_> {
    /// Parameter `name` (`$1`) of type `data_type`: its value if bound, a NULL of the type otherwise.
    fn parameter(&self, name: &str, data_type: DataType) -> Result<MatchExpr, ErrorReport> {
        let number = name.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()).filter(|n| *n > 0);
        let Some(number) = number else { return Err(untyped_parameter(name)) };
        let bound = self.values.and_then(|values| values.get(number - 1));
        let value = match bound {
            Some(value) if value.is_null() => ScalarValue::try_from(&data_type),
            Some(value) => value.cast_to(&data_type),
            None => ScalarValue::try_from(&data_type),
        }
        .map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        self.parameters.borrow_mut().push((number, data_type));
        Ok(MatchExpr::Literal(value))
    }

    fn column(&self, ident: &ast::Ident) -> Result<usize, ErrorReport> {
        let name = crate::names::normalize_ident(ident);
        self.schema
            .index_of(&name)
            .map_err(|_| ErrorReport::new(SqlState::UNDEFINED_COLUMN, format!("column \"{name}\" does not exist")))
    }

    /// A pattern variable's number, or a `SUBSET`'s (after the pattern's).
    fn variable(&self, ident: &ast::Ident) -> Result<usize, ErrorReport> {
        let name = crate::names::normalize_ident(ident);
        let subset = || self.subsets.iter().position(|(s, _)| *s == name).map(|i| self.variables.len() + i);
        self.variables.iter().position(|v| *v == name).or_else(subset).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("pattern variable \"{name}\" is not in the PATTERN"))
        })
    }

    /// A column reference: `col` or `variable.col`.
    fn reference(&self, expr: &ast::Expr) -> Result<(Option<usize>, usize), ErrorReport> {
        match expr {
            ast::Expr::Identifier(ident) => Ok((None, self.column(ident)?)),
            ast::Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                Ok((Some(self.variable(&parts[0])?), self.column(&parts[1])?))
            }
            other => Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("expected a column or variable.column, not {other}"),
            )),
        }
    }

    fn expr(&self, expr: &ast::Expr) -> Result<MatchExpr, ErrorReport> {
        use ast::{BinaryOperator as B, Expr as E};
        Ok(match expr {
            E::Identifier(_) | E::CompoundIdentifier(_) => {
                let (variable, column) = self.reference(expr)?;
                MatchExpr::Column { variable, column }
            }
            E::Nested(inner) => self.expr(inner)?,
            E::Value(ast::ValueWithSpan { value: ast::Value::Placeholder(name), .. }) => {
                // Alone, a parameter has no type to take.
                return Err(untyped_parameter(name));
            }
            E::Value(value) => MatchExpr::Literal(literal(&value.value)?),
            E::UnaryOp { op: ast::UnaryOperator::Not, expr } => MatchExpr::Not(Box::new(self.expr(expr)?)),
            E::UnaryOp { op: ast::UnaryOperator::Minus, expr } => MatchExpr::Negate(Box::new(self.expr(expr)?)),
            E::IsNull(inner) => MatchExpr::IsNull { expr: Box::new(self.expr(inner)?), negated: false },
            E::IsNotNull(inner) => MatchExpr::IsNull { expr: Box::new(self.expr(inner)?), negated: true },
            E::BinaryOp { left, op, right } => {
                let op = match op {
                    B::Plus => BinaryOp::Plus,
                    B::Minus => BinaryOp::Minus,
                    B::Multiply => BinaryOp::Multiply,
                    B::Divide => BinaryOp::Divide,
                    B::Eq => BinaryOp::Eq,
                    B::NotEq => BinaryOp::NotEq,
                    B::Lt => BinaryOp::Lt,
                    B::LtEq => BinaryOp::LtEq,
                    B::Gt => BinaryOp::Gt,
                    B::GtEq => BinaryOp::GtEq,
                    B::And => BinaryOp::And,
                    B::Or => BinaryOp::Or,
                    other => {
                        return Err(ErrorReport::new(
                            SqlState::FEATURE_NOT_SUPPORTED,
                            format!("the operator {other} is not supported in MATCH_RECOGNIZE yet"),
                        ));
                    }
                };
                // A parameter takes the type of the other side (a boolean beside AND or OR).
                let typed = |other: &MatchExpr| match op {
                    BinaryOp::And | BinaryOp::Or => DataType::Boolean,
                    _ => other.data_type(self.schema),
                };
                let (left, right) = match (placeholder(left), placeholder(right)) {
                    (Some(name), None) => {
                        let right = self.expr(right)?;
                        (self.parameter(name, typed(&right))?, right)
                    }
                    (None, Some(name)) => {
                        let left = self.expr(left)?;
                        let parameter = self.parameter(name, typed(&left))?;
                        (left, parameter)
                    }
                    _ => (self.expr(left)?, self.expr(right)?),
                };
                MatchExpr::Binary { left: Box::new(left), op, right: Box::new(right) }
            }
            E::Function(function) => self.function(function)?,
            other => {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("the expression {other} is not supported in MATCH_RECOGNIZE yet"),
                ));
            }
        })
    }

    fn function(&self, function: &ast::Function) -> Result<MatchExpr, ErrorReport> {
        let name = function.name.to_string().to_uppercase();
        if let Some(name) = name.strip_prefix(FINAL_PREFIX) {
            if !matches!(name, "FIRST" | "LAST" | "SUM" | "COUNT" | "AVG" | "MIN" | "MAX") {
                return Err(ErrorReport::new(
                    SqlState::SYNTAX_ERROR,
                    format!("FINAL qualifies FIRST, LAST and aggregates, not {name}"),
                ));
            }
            let mut inner = function.clone();
            inner.name = ast::ObjectName::from(vec![ast::Ident::new(name)]);
            return Ok(MatchExpr::Final(Box::new(self.function(&inner)?)));
        }
        let args: Vec<&ast::FunctionArgExpr> = match &function.args {
            ast::FunctionArguments::List(list) => list
                .args
                .iter()
                .map(|arg| match arg {
                    ast::FunctionArg::Unnamed(arg) => arg,
                    ast::FunctionArg::Named { arg, .. } | ast::FunctionArg::ExprNamed { arg, .. } => arg,
                })
                .collect(),
            _ => Vec::new(),
        };
        let expr_arg = |n: usize| match args.get(n) {
            Some(ast::FunctionArgExpr::Expr(expr)) => Ok(Some(expr)),
            None => Ok(None),
            Some(other) => {
                Err(ErrorReport::new(SqlState::SYNTAX_ERROR, format!("{name} does not take {other} as an argument")))
            }
        };
        let offset = |n: usize| -> Result<usize, ErrorReport> {
            match expr_arg(n)? {
                None => Ok(1),
                Some(ast::Expr::Value(v)) => match &v.value {
                    ast::Value::Number(n, _) => n.parse::<usize>().map_err(|_| bad_offset(&name)),
                    _ => Err(bad_offset(&name)),
                },
                Some(_) => Err(bad_offset(&name)),
            }
        };
        let first = || {
            expr_arg(0)?.ok_or_else(|| ErrorReport::new(SqlState::SYNTAX_ERROR, format!("{name} needs an argument")))
        };
        Ok(match name.as_str() {
            "PREV" | "NEXT" => {
                let steps = offset(1)? as i64;
                let expr = self.expr(first()?)?;
                if expr.has_aggregate() {
                    return Err(ErrorReport::new(
                        SqlState::GROUPING_ERROR,
                        format!("{name} looks at one row: its argument cannot hold an aggregate"),
                    ));
                }
                MatchExpr::Shift { expr: Box::new(expr), offset: if name == "PREV" { steps } else { -steps } }
            }
            "FIRST" | "LAST" => {
                let (variable, column) = self.reference(first()?)?;
                let offset = match args.len() {
                    1 => 0,
                    _ => offset(1)?,
                };
                MatchExpr::Navigate { variable, column, from_end: name == "LAST", offset }
            }
            "SUM" | "COUNT" | "AVG" | "MIN" | "MAX" => {
                let function = match name.as_str() {
                    "SUM" => Aggregate::Sum,
                    "COUNT" => Aggregate::Count,
                    "AVG" => Aggregate::Avg,
                    "MIN" => Aggregate::Min,
                    _ => Aggregate::Max,
                };
                match args.first() {
                    Some(ast::FunctionArgExpr::Wildcard) if function == Aggregate::Count => {
                        MatchExpr::Aggregate { function, variable: None, column: None }
                    }
                    Some(ast::FunctionArgExpr::QualifiedWildcard(name)) if function == Aggregate::Count => {
                        let variable = match name.0.as_slice() {
                            [part] => match part.as_ident() {
                                Some(ident) => self.variable(ident)?,
                                None => return Err(bad_argument(&format!("{name}.*"))),
                            },
                            _ => return Err(bad_argument(&format!("{name}.*"))),
                        };
                        MatchExpr::Aggregate { function, variable: Some(variable), column: None }
                    }
                    _ => {
                        let argument = first()?;
                        if let ast::Expr::Function(inner) = argument
                            && matches!(
                                inner.name.to_string().to_uppercase().as_str(),
                                "SUM" | "COUNT" | "AVG" | "MIN" | "MAX"
                            )
                        {
                            return Err(ErrorReport::new(
                                SqlState::GROUPING_ERROR,
                                format!("aggregate function calls cannot be nested: {inner} inside {name}"),
                            ));
                        }
                        let (variable, column) = self.reference(argument)?;
                        MatchExpr::Aggregate { function, variable, column: Some(column) }
                    }
                }
            }
            "MATCH_NUMBER" => MatchExpr::MatchNumber,
            // The time of the match's last row (so far): LAST of the event-time column.
            "MATCH_ROWTIME" => match self.time.get() {
                Some(column) => MatchExpr::Navigate { variable: None, column, from_end: true, offset: 0 },
                None => {
                    return Err(ErrorReport::new(
                        SqlState::DATATYPE_MISMATCH,
                        "MATCH_ROWTIME() needs a timestamp as the first ORDER BY column of MATCH_RECOGNIZE",
                    ));
                }
            },
            "CLASSIFIER" => MatchExpr::Classifier,
            _ => {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("the function {name} is not supported in MATCH_RECOGNIZE yet"),
                ));
            }
        })
    }
}

/// The placeholder name of `expr` if it is a parameter (`$1`).
fn placeholder(expr: &ast::Expr) -> Option<&str> {
    match expr {
        ast::Expr::Value(ast::ValueWithSpan { value: ast::Value::Placeholder(name), .. }) => Some(name),
        _ => None,
    }
}

fn untyped_parameter(name: &str) -> ErrorReport {
    ErrorReport::new(
        SqlState::INDETERMINATE_DATATYPE,
        format!("could not determine the data type of parameter {name} in MATCH_RECOGNIZE"),
    )
    .with_hint("Compare the parameter with a column or an expression of a known type.")
}

fn bad_offset(function: &str) -> ErrorReport {
    ErrorReport::new(SqlState::SYNTAX_ERROR, format!("the offset of {function} must be a whole number"))
}

fn bad_argument(what: &str) -> ErrorReport {
    ErrorReport::new(SqlState::SYNTAX_ERROR, format!("unexpected argument {what}"))
}

/// A literal of a condition or measure.
fn literal(value: &ast::Value) -> Result<ScalarValue, ErrorReport> {
    Ok(match value {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => ScalarValue::Int64(Some(i)),
            Err(_) => ScalarValue::Float64(Some(n.parse::<f64>().map_err(|_| {
                ErrorReport::new(SqlState::INVALID_TEXT_REPRESENTATION, format!("invalid number {n}"))
            })?)),
        },
        ast::Value::SingleQuotedString(s) => ScalarValue::Utf8(Some(s.clone())),
        ast::Value::Boolean(b) => ScalarValue::Boolean(Some(*b)),
        ast::Value::Null => ScalarValue::Null,
        other => {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("the literal {other} is not supported in MATCH_RECOGNIZE yet"),
            ));
        }
    })
}
