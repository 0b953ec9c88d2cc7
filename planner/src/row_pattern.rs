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

use weir_common::pattern::Pattern;

/// A parsed `PATTERN`: the pattern over variable numbers, and the variables' names by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPattern {
    pub pattern: Pattern,
    pub variables: Vec<String>,
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
        if max.is_some_and(|max| max < min) {
            return self.error(format!("the quantifier {{{min},{}}} allows fewer than its minimum", max.unwrap_or(0)));
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
