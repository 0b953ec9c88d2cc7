//! The statements that read a relation bit by bit: `SUBSCRIBE` (a change feed, in Materialize's form), and the
//! cursors Postgres drivers use (`DECLARE`, `FETCH`), parsed here because they take forms sqlparser does not know:
//!
//! ```sql
//! SUBSCRIBE [TO] name [WITH (snapshot = true | false)]
//! COPY (SUBSCRIBE [TO] name ...) TO STDOUT [WITH (FORMAT csv, ...)]
//! DECLARE c [NO SCROLL] CURSOR [WITH HOLD | WITHOUT HOLD] FOR { query | SUBSCRIBE [TO] name ... }
//! FETCH [NEXT | FORWARD [n | ALL] | ALL | n] [FROM | IN] c [WITH (timeout = '1s')]
//! ```
//!
//! `CLOSE` is sqlparser's.

use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};

/// `SUBSCRIBE [TO] relation [WITH (snapshot = bool)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub relation: ast::ObjectName,
    /// Whether the relation's rows come first (as inserted at the subscription's start); default true.
    pub snapshot: bool,
}

/// `DECLARE name CURSOR ... FOR ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct Declare {
    pub name: ast::Ident,
    /// `WITH HOLD`: the cursor outlives its transaction block.
    pub hold: bool,
    pub body: CursorOf,
}

/// What a cursor reads.
#[derive(Debug, Clone, PartialEq)]
pub enum CursorOf {
    Query(Box<ast::Query>),
    Subscribe(Subscribe),
}

/// `FETCH ... c [WITH (timeout = ...)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    pub name: ast::Ident,
    /// How many rows; `None` for all.
    pub count: Option<u64>,
    /// How long to wait for a subscription's first row (`'1s'`, `'500ms'`); `None` waits until one comes.
    pub timeout: Option<String>,
}

pub(crate) fn at_subscribe(parser: &Parser) -> bool {
    crate::parse::at_words(parser, &["SUBSCRIBE"])
}

pub(crate) fn at_copy_subscribe(parser: &Parser) -> bool {
    crate::parse::at_words(parser, &["COPY"])
        && parser.peek_nth_token(1).token == Token::LParen
        && matches!(&parser.peek_nth_token(2).token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("SUBSCRIBE"))
}

/// `SUBSCRIBE [TO] name [WITH (option [=] value, ...)]`.
pub(crate) fn parse_subscribe(parser: &mut Parser) -> Result<Subscribe, ParserError> {
    parser.next_token();
    let _ = parser.parse_keyword(Keyword::TO);
    let relation = parser.parse_object_name(false)?;
    let mut snapshot = true;
    if parser.parse_keyword(Keyword::WITH) {
        parser.expect_token(&Token::LParen)?;
        loop {
            let option = parser.parse_identifier()?;
            let _ = parser.consume_token(&Token::Eq);
            match option.value.to_ascii_lowercase().as_str() {
                "snapshot" => snapshot = parse_bool(parser)?,
                other => {
                    return Err(ParserError::ParserError(format!(
                        "SUBSCRIBE option {other} is not supported; it takes snapshot"
                    )));
                }
            }
            if !parser.consume_token(&Token::Comma) {
                break;
            }
        }
        parser.expect_token(&Token::RParen)?;
    }
    Ok(Subscribe { relation, snapshot })
}

fn parse_bool(parser: &mut Parser) -> Result<bool, ParserError> {
    let token = parser.next_token();
    let word = match &token.token {
        Token::Word(w) => w.value.to_ascii_lowercase(),
        Token::SingleQuotedString(s) => s.to_ascii_lowercase(),
        _ => return parser.expected("true or false", token),
    };
    match word.as_str() {
        "true" | "on" => Ok(true),
        "false" | "off" => Ok(false),
        _ => parser.expected("true or false", token),
    }
}

/// `COPY (SUBSCRIBE ...) TO STDOUT [options]`: the subscription, and the `COPY` statement with a placeholder query
/// in its place (whose options sqlparser reads).
pub(crate) fn parse_copy_subscribe(
    parser: &mut Parser,
    dialect: &crate::dialect::WeirDialect,
) -> Result<(Subscribe, ast::Statement), ParserError> {
    parser.next_token();
    parser.expect_token(&Token::LParen)?;
    let subscribe = parse_subscribe(parser)?;
    parser.expect_token(&Token::RParen)?;
    // The rest (`TO STDOUT WITH (...)`) parsed as the `COPY` of a placeholder query.
    let placeholder = "COPY (SELECT 1) ";
    let mut tokens: Vec<TokenWithSpan> = datafusion::sql::sqlparser::tokenizer::Tokenizer::new(dialect, placeholder)
        .tokenize_with_location()
        .map_err(|e| ParserError::TokenizerError(e.to_string()))?;
    tokens.retain(|t| t.token != Token::EOF);
    let prefix = tokens.len();
    let start = parser.index();
    let mut rest = Vec::new();
    loop {
        let token = parser.peek_nth_token(rest.len());
        if matches!(token.token, Token::SemiColon | Token::EOF) {
            break;
        }
        rest.push(token);
    }
    tokens.extend(rest);
    let mut copy = Parser::new(dialect).with_tokens_with_locations(tokens);
    let statement = copy.parse_statement()?;
    for _ in prefix..copy.index() {
        parser.next_token();
    }
    debug_assert!(parser.index() >= start);
    Ok((subscribe, statement))
}

/// `DECLARE name [BINARY] [NO SCROLL] CURSOR [WITH HOLD | WITHOUT HOLD] FOR {query | SUBSCRIBE ...}`.
pub(crate) fn parse_declare(parser: &mut Parser) -> Result<Declare, ParserError> {
    parser.next_token();
    let name = parser.parse_identifier()?;
    loop {
        if parser.parse_keyword(Keyword::CURSOR) {
            break;
        }
        if parser.parse_keywords(&[Keyword::NO, Keyword::SCROLL])
            || parser.parse_keyword(Keyword::ASENSITIVE)
            || parser.parse_keyword(Keyword::INSENSITIVE)
        {
            continue;
        }
        let token = parser.next_token();
        return match &token.token {
            Token::Word(w) if w.keyword == Keyword::SCROLL => {
                Err(ParserError::ParserError("SCROLL cursors are not supported; Weir's cursors read forward".into()))
            }
            Token::Word(w) if w.keyword == Keyword::BINARY => Err(ParserError::ParserError(
                "BINARY cursors are not supported; ask for binary results with the extended protocol".into(),
            )),
            _ => parser.expected("CURSOR", token),
        };
    }
    let hold = if parser.parse_keywords(&[Keyword::WITH, Keyword::HOLD]) {
        true
    } else {
        let _ = parser.parse_keywords(&[Keyword::WITHOUT, Keyword::HOLD]);
        false
    };
    parser.expect_keyword(Keyword::FOR)?;
    let body = match at_subscribe(parser) {
        true => CursorOf::Subscribe(parse_subscribe(parser)?),
        false => CursorOf::Query(parser.parse_query()?),
    };
    Ok(Declare { name, hold, body })
}

/// `FETCH [direction] [FROM | IN] name [WITH (timeout = 'duration')]`, forward directions only.
pub(crate) fn parse_fetch(parser: &mut Parser) -> Result<Fetch, ParserError> {
    parser.next_token();
    let backward =
        [Keyword::PRIOR, Keyword::FIRST, Keyword::LAST, Keyword::ABSOLUTE, Keyword::RELATIVE, Keyword::BACKWARD];
    if let Token::Word(w) = &parser.peek_token().token
        && backward.contains(&w.keyword)
    {
        return Err(ParserError::ParserError(format!(
            "FETCH {} is not supported; Weir's cursors read forward",
            w.value.to_uppercase()
        )));
    }
    let count = if parser.parse_keyword(Keyword::NEXT) {
        Some(1)
    } else if parser.parse_keyword(Keyword::FORWARD) {
        match parser.parse_keyword(Keyword::ALL) {
            true => None,
            false => match parser.peek_token().token {
                Token::Number(..) => Some(parse_count(parser)?),
                _ => Some(1),
            },
        }
    } else if parser.parse_keyword(Keyword::ALL) {
        None
    } else if let Token::Number(..) = parser.peek_token().token {
        Some(parse_count(parser)?)
    } else {
        Some(1)
    };
    let _ = parser.parse_keyword(Keyword::FROM) || parser.parse_keyword(Keyword::IN);
    let name = parser.parse_identifier()?;
    let mut timeout = None;
    if parser.parse_keyword(Keyword::WITH) {
        parser.expect_token(&Token::LParen)?;
        let option = parser.parse_identifier()?;
        if !option.value.eq_ignore_ascii_case("timeout") {
            return Err(ParserError::ParserError(format!(
                "FETCH option {} is not supported; it takes timeout",
                option.value
            )));
        }
        let _ = parser.consume_token(&Token::Eq);
        let token = parser.next_token();
        timeout = Some(match token.token {
            Token::SingleQuotedString(s) => s,
            Token::Number(n, _) => n,
            _ => return parser.expected("a duration", token),
        });
        parser.expect_token(&Token::RParen)?;
    }
    Ok(Fetch { name, count, timeout })
}

fn parse_count(parser: &mut Parser) -> Result<u64, ParserError> {
    let token = parser.next_token();
    match &token.token {
        Token::Number(n, _) => n.parse().map_err(|_| ParserError::ParserError(format!("invalid FETCH count {n}"))),
        _ => parser.expected("a row count", token),
    }
}
