//! Splitting a query string into statements, with Postgres-style syntax errors.
//!
//! The whole query string is parsed before anything runs, as Postgres does: a syntax error in the third statement
//! means none of them executes.

use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};
use weir_common::error::char_position;
use weir_common::{ErrorReport, RelationKind, SqlState};

use crate::cursor::{Declare, Fetch, Subscribe};
use crate::dialect::WeirDialect;
use crate::row_pattern::RowPatternClause;
use crate::sink::{self, CreateSink};
use crate::source::{self, CreateSource};

/// Deep enough for generated SQL from BI tools, shallow enough to stay far from the stack limit.
pub(crate) const RECURSION_LIMIT: usize = 200;

/// How deep a statement's expressions may nest (operators chained, groups nested; see [`check_depth`]). Planning and
/// evaluation walk expressions recursively; this bound is what the server's statement and dataflow threads are
/// sized for (`weir_server::exec::STACK_BYTES`), with room to spare in a debug build.
pub const MAX_EXPRESSION_DEPTH: usize = 1_000;

/// A statement Weir knows how to run.
#[derive(Debug, Clone, PartialEq)]
pub enum WeirStatement {
    /// A statement in sqlparser's vocabulary (queries, DML, most DDL, SET, transactions).
    Sql(Box<ast::Statement>),
    /// `CREATE SOURCE`.
    CreateSource(Box<CreateSource>),
    /// `CREATE MATERIALIZED VIEW ... AS query [EMIT ON WINDOW CLOSE]`; the statement is sqlparser's `CreateView`.
    CreateMaterializedView { statement: Box<ast::Statement>, emit_on_window_close: bool },
    /// `DROP SOURCE [IF EXISTS] name [, ...] [CASCADE]`.
    DropSource { names: Vec<ast::ObjectName>, if_exists: bool, cascade: bool },
    /// `CREATE SINK`.
    CreateSink(Box<CreateSink>),
    /// `DROP SINK [IF EXISTS] name [, ...]`.
    DropSink { names: Vec<ast::ObjectName>, if_exists: bool },
    /// `SHOW SINKS`.
    ShowSinks,
    /// `FLUSH`: returns once every source's input so far is reflected in every view.
    Flush,
    /// `EXPLAIN CREATE MATERIALIZED VIEW ...`: the view's streaming dataflow, without creating it.
    ExplainMaterializedView { statement: Box<ast::Statement>, emit_on_window_close: bool },
    /// `SHOW CREATE {TABLE | SOURCE | VIEW | MATERIALIZED VIEW} name`.
    ShowCreate { kind: RelationKind, name: ast::ObjectName },
    /// `CREATE {USER | ROLE} name [WITH] [LOGIN | PASSWORD 'secret' | PASSWORD NULL ...]` (a role with `LOGIN`;
    /// `CREATE USER` implies it), or `ALTER {USER | ROLE} name [WITH] PASSWORD ...` when `alter`.
    User { name: ast::Ident, password: Option<Option<String>>, alter: bool },
    /// `DROP {USER | ROLE} [IF EXISTS] name [, ...]`.
    DropUser { names: Vec<ast::Ident>, if_exists: bool },
    /// `SUBSCRIBE [TO] relation [WITH (snapshot = ...)]`: the relation's rows, then every change, as they come.
    Subscribe(Subscribe),
    /// `COPY (SUBSCRIBE ...) TO STDOUT [options]`; `copy` is the `COPY` statement, whose query is a placeholder.
    CopySubscribe { subscribe: Subscribe, copy: Box<ast::Statement> },
    /// `DECLARE name CURSOR FOR {query | SUBSCRIBE ...}`.
    Declare(Box<Declare>),
    /// `FETCH ... name [WITH (timeout = ...)]`.
    Fetch(Fetch),
}

/// One statement of a query string.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedStatement {
    pub statement: WeirStatement,
    /// The statement as the user wrote it, without the trailing semicolon.
    pub text: String,
    /// The `MATCH_RECOGNIZE` patterns of the statement, parsed by Weir; the statement names each by its placeholder.
    pub row_patterns: Vec<RowPatternClause>,
}

/// A syntax error, with the position Postgres would report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    /// 1-based character position in the query string.
    pub position: Option<usize>,
}

impl From<ParseError> for ErrorReport {
    fn from(err: ParseError) -> Self {
        let report = ErrorReport::new(err.code, err.message).with_position(err.position);
        match err.detail {
            Some(detail) => report.with_detail(detail),
            None => report,
        }
    }
}

/// Parses every statement of `sql`. Empty statements (`;;`) are skipped.
pub fn parse_sql(sql: &str) -> Result<Vec<ParsedStatement>, ParseError> {
    let dialect = WeirDialect::default();
    let tokens =
        Tokenizer::new(&dialect, sql).with_unescape(true).tokenize_with_location().map_err(|err| ParseError {
            code: SqlState::SYNTAX_ERROR,
            message: lower_first(&err.message),
            detail: None,
            position: char_position(sql, err.location.line, err.location.column),
        })?;
    check_depth(sql, &tokens, MAX_EXPRESSION_DEPTH)?;
    check_numeric_types(sql, &tokens)?;
    let tokens = crate::windows::flink_form(tokens);
    let (tokens, emits) = strip_emit_clauses(tokens);
    let (tokens, mut row_patterns) = crate::row_pattern::extract_row_patterns(sql, tokens)?;
    // `FOR SYSTEM_TIME AS OF` (temporal joins) only where it is written (see `WeirDialect`).
    let words: Vec<&Token> = tokens.iter().map(|t| &t.token).filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    let versioned = words.windows(2).any(|pair| {
        matches!((pair[0], pair[1]), (Token::Word(a), Token::Word(b))
            if a.keyword == Keyword::FOR && b.keyword == Keyword::SYSTEM_TIME)
    });
    let dialect = WeirDialect { table_versioning: versioned };
    let mut parser =
        Parser::new(&dialect).with_recursion_limit(RECURSION_LIMIT).with_tokens_with_locations(tokens.clone());
    let mut statements = Vec::new();
    let mut expecting_delimiter = false;
    loop {
        while parser.consume_token(&Token::SemiColon) {
            expecting_delimiter = false;
        }
        let next = parser.peek_token();
        if next.token == Token::EOF {
            break;
        }
        if expecting_delimiter {
            return Err(syntax_error_at(sql, &next, None));
        }
        let start = next.span.start;
        let statement = if source::at_create_source(&parser, &tokens) {
            source::parse_create_source(&mut parser).map(|s| WeirStatement::CreateSource(Box::new(s)))
        } else if sink::at_create_sink(&parser) {
            sink::parse_create_sink(&mut parser).map(|s| WeirStatement::CreateSink(Box::new(s)))
        } else if at_words(&parser, &["DROP", "SOURCE"]) {
            parse_drop_source(&mut parser)
        } else if at_words(&parser, &["DROP", "SINK"]) {
            parser.next_token();
            parser.next_token();
            let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            parser
                .parse_comma_separated(|p| p.parse_object_name(false))
                .map(|names| WeirStatement::DropSink { names, if_exists })
        } else if at_words(&parser, &["SHOW", "SINKS"]) {
            parser.next_token();
            parser.next_token();
            Ok(WeirStatement::ShowSinks)
        } else if at_words(&parser, &["SHOW", "MATERIALIZED", "VIEWS"]) {
            for _ in 0..3 {
                parser.next_token();
            }
            let variable = vec![ast::Ident::new("materialized"), ast::Ident::new("views")];
            Ok(WeirStatement::Sql(Box::new(ast::Statement::ShowVariable { variable })))
        } else if let Some((kind, words)) = at_show_create(&parser) {
            for _ in 0..words {
                parser.next_token();
            }
            parser.parse_object_name(false).map(|name| WeirStatement::ShowCreate { kind, name })
        } else if at_words(&parser, &["CREATE", "USER"])
            || at_words(&parser, &["CREATE", "ROLE"])
            || at_words(&parser, &["ALTER", "USER"])
            || at_words(&parser, &["ALTER", "ROLE"])
        {
            parse_user(&mut parser)
        } else if at_words(&parser, &["DROP", "USER"]) || at_words(&parser, &["DROP", "ROLE"]) {
            parser.next_token();
            parser.next_token();
            let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            parser
                .parse_comma_separated(|p| p.parse_identifier())
                .map(|names| WeirStatement::DropUser { names, if_exists })
        } else if crate::cursor::at_subscribe(&parser) {
            crate::cursor::parse_subscribe(&mut parser).map(WeirStatement::Subscribe)
        } else if crate::cursor::at_copy_subscribe(&parser) {
            crate::cursor::parse_copy_subscribe(&mut parser, &dialect)
                .map(|(subscribe, copy)| WeirStatement::CopySubscribe { subscribe, copy: Box::new(copy) })
        } else if at_words(&parser, &["DECLARE"]) {
            crate::cursor::parse_declare(&mut parser).map(|d| WeirStatement::Declare(Box::new(d)))
        } else if at_words(&parser, &["FETCH"]) {
            crate::cursor::parse_fetch(&mut parser).map(WeirStatement::Fetch)
        } else if at_words(&parser, &["FLUSH"]) {
            parser.next_token();
            Ok(WeirStatement::Flush)
        } else {
            parser.parse_statement().map(|s| {
                let end = parser.peek_token();
                let emit_on_window_close =
                    emits.contains(&end.span.start) || (end.token == Token::EOF && emits.contains(&EOF_EMIT));
                match s {
                ast::Statement::Explain { statement, .. }
                    if matches!(&*statement, ast::Statement::CreateView(view) if view.materialized) =>
                {
                    WeirStatement::ExplainMaterializedView { statement, emit_on_window_close }
                }
                ast::Statement::CreateView(view) if view.materialized => {
                    WeirStatement::CreateMaterializedView {
                        statement: Box::new(ast::Statement::CreateView(view)),
                        emit_on_window_close,
                    }
                }
                s => WeirStatement::Sql(Box::new(s)),
                }
            })
        }
        .map_err(|err| convert_error(sql, &tokens, err))?;
        // The statement ends where the next token (`;` or the end of input) starts.
        let end = parser.peek_token().span.start;
        // The patterns inside this statement (the end of input is at line 0).
        let (inside, after): (Vec<_>, Vec<_>) = std::mem::take(&mut row_patterns)
            .into_iter()
            .partition(|p| p.location >= start && (p.location < end || end.line == 0));
        row_patterns = after;
        if let WeirStatement::Sql(inner)
        | WeirStatement::CreateMaterializedView { statement: inner, .. }
        | WeirStatement::ExplainMaterializedView { statement: inner, .. } = &statement
        {
            check_width(inner)?;
        }
        statements.push(ParsedStatement {
            statement,
            text: slice(sql, start, end).trim_end().to_string(),
            row_patterns: inside,
        });
        expecting_delimiter = true;
    }
    Ok(statements)
}

/// Whether `sql`'s expressions nest at most `limit` levels deep (the over-estimate [`check_depth`] takes); false when
/// it does not tokenize. Cheap and not recursive: for deciding whether a statement's tree may be cloned or dropped on
/// a small stack.
pub fn nests_at_most(sql: &str, limit: usize) -> bool {
    Tokenizer::new(&WeirDialect::default(), sql)
        .with_unescape(true)
        .tokenize_with_location()
        .is_ok_and(|tokens| check_depth(sql, &tokens, limit).is_ok())
}

/// Refuses a statement whose expressions would nest deeper than [`MAX_EXPRESSION_DEPTH`], before anything builds
/// them: sqlparser builds a chain of operators (`1+1+...`, `a AND b AND ...`, `x::int::int...`) in a loop, so its
/// recursion limit does not see it, while every later pass over the tree recurses once per operator.
///
/// The bound is taken over the tokens, an over-estimate that needs no tree: within a parenthesized (or bracketed)
/// group, each comma-separated part counts its operators plus the deepest group inside it, and a group counts one
/// more than its deepest part.
fn check_depth(sql: &str, tokens: &[TokenWithSpan], limit: usize) -> Result<(), ParseError> {
    /// One open group: the operators of its current part, the deepest group inside that part, its deepest part.
    #[derive(Default)]
    struct Group {
        operators: usize,
        inner: usize,
        deepest: usize,
    }
    let mut groups = vec![Group::default()];
    for token in tokens {
        let depth = match &token.token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                groups.push(Group::default());
                groups.len() - 1
            }
            Token::RParen | Token::RBracket | Token::RBrace if groups.len() > 1 => {
                let closed = groups.pop().unwrap_or_default();
                let depth = closed.deepest.max(closed.operators + closed.inner) + 1;
                groups.last_mut().map_or(0, |g| {
                    g.inner = g.inner.max(depth);
                    g.operators + g.inner
                })
            }
            Token::Comma | Token::SemiColon => {
                if let Some(g) = groups.last_mut() {
                    g.deepest = g.deepest.max(g.operators + g.inner);
                    g.operators = 0;
                    g.inner = 0;
                }
                0
            }
            Token::Placeholder(name) => {
                // `$` alone is a pattern's end anchor; `$name` is not a number.
                let digits = name.strip_prefix('$').filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if digits.is_some_and(|n| n.parse::<u64>().map_or(true, |n| n == 0 || n > MAX_PARAMETER)) {
                    return Err(ParseError {
                        code: SqlState::UNDEFINED_PARAMETER,
                        message: format!("there is no parameter {name}"),
                        detail: Some(format!("Parameters are numbered from $1 to ${MAX_PARAMETER}.")),
                        position: char_position(sql, token.span.start.line, token.span.start.column),
                    });
                }
                0
            }
            token if is_operator(token) => groups.last_mut().map_or(0, |g| {
                g.operators += 1;
                g.operators + g.inner
            }),
            _ => 0,
        };
        if depth > limit || groups.len() > limit {
            return Err(ParseError {
                code: SqlState::STATEMENT_TOO_COMPLEX,
                message: "statement is too complex".into(),
                detail: Some(format!("Its expressions nest more than {limit} levels deep here.")),
                position: char_position(sql, token.span.start.line, token.span.start.column),
            });
        }
    }
    Ok(())
}

/// Refuses `NUMERIC(p, s)` / `DECIMAL(p, s)` outside Postgres' ranges (`1 <= p <= 1000`, `0 <= s <= p`; `22023`)
/// before the numbers reach a planner that would take them modulo 256.
fn check_numeric_types(sql: &str, tokens: &[TokenWithSpan]) -> Result<(), ParseError> {
    let significant: Vec<&TokenWithSpan> = tokens.iter().filter(|t| !matches!(t.token, Token::Whitespace(_))).collect();
    for (at, token) in significant.iter().enumerate() {
        let Token::Word(word) = &token.token else { continue };
        if word.quote_style.is_some() || !matches!(word.keyword, Keyword::NUMERIC | Keyword::DECIMAL | Keyword::DEC) {
            continue;
        }
        if !matches!(significant.get(at + 1).map(|t| &t.token), Some(Token::LParen)) {
            continue;
        }
        // `(p)`, `(p, s)` or `(p, -s)`.
        let number = |i: usize| match significant.get(i).map(|t| &t.token) {
            Some(Token::Number(n, _)) => Some(n.parse::<i128>().unwrap_or(i128::MAX)),
            _ => None,
        };
        let Some(precision) = number(at + 2) else { continue };
        let scale = match significant.get(at + 3).map(|t| &t.token) {
            Some(Token::Comma) => match significant.get(at + 4).map(|t| &t.token) {
                Some(Token::Minus) => number(at + 5).map(|s| -s),
                _ => number(at + 4),
            },
            _ => Some(0),
        };
        let name = word.value.to_uppercase();
        let message = if !(1..=1000).contains(&precision) {
            format!("{name} precision {precision} must be between 1 and 1000")
        } else if let Some(scale) = scale.filter(|s| !(0..=precision).contains(s)) {
            format!("{name} scale {scale} must be between 0 and precision {precision}")
        } else {
            continue;
        };
        return Err(ParseError {
            code: SqlState::INVALID_PARAMETER_VALUE,
            message,
            detail: None,
            position: char_position(sql, token.span.start.line, token.span.start.column),
        });
    }
    Ok(())
}

/// Whether a token joins expressions (and so deepens the tree a chain of them builds).
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => {
            word.quote_style.is_none()
                && matches!(
                    word.keyword,
                    Keyword::AND
                        | Keyword::OR
                        | Keyword::NOT
                        | Keyword::IS
                        | Keyword::LIKE
                        | Keyword::ILIKE
                        | Keyword::IN
                        | Keyword::BETWEEN
                        | Keyword::COLLATE
                        | Keyword::AT
                        | Keyword::SIMILAR
                        | Keyword::XOR
                        | Keyword::OVERLAPS
                        | Keyword::DIV
                        // Set operations and joins chain into trees as deep as the chain is long.
                        | Keyword::UNION
                        | Keyword::INTERSECT
                        | Keyword::EXCEPT
                        | Keyword::JOIN
                )
        }
        Token::EOF
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::QuoteDelimitedStringLiteral(_)
        | Token::NationalQuoteDelimitedStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Comma
        | Token::Whitespace(_)
        | Token::LParen
        | Token::RParen
        | Token::Period
        | Token::Colon
        | Token::SemiColon
        | Token::Backslash
        | Token::LBracket
        | Token::RBracket
        | Token::LBrace
        | Token::RBrace
        | Token::Placeholder(_) => false,
        _ => true,
    }
}

/// Postgres' bound on the entries of a select list (`54011`).
pub const MAX_SELECT_ITEMS: usize = 1664;
/// Postgres' bound on a table's columns (`54011`).
pub const MAX_TABLE_COLUMNS: usize = 1600;
/// The highest parameter number, `$65535`: the protocol counts parameters in 16 bits.
pub const MAX_PARAMETER: u64 = 65_535;

/// Refuses what Postgres refuses by size: select lists and tables too wide. (Planning time grows with the square of a
/// select list's width.)
fn check_width(statement: &ast::Statement) -> Result<(), ParseError> {
    use ast::{Visit, Visitor};
    use std::ops::ControlFlow;
    struct Width;
    impl Visitor for Width {
        type Break = ParseError;
        fn pre_visit_query(&mut self, query: &ast::Query) -> ControlFlow<ParseError> {
            if let ast::SetExpr::Select(select) = query.body.as_ref() {
                if select.projection.len() > MAX_SELECT_ITEMS {
                    return ControlFlow::Break(too_wide(format!(
                        "target lists can have at most {MAX_SELECT_ITEMS} entries"
                    )));
                }
                // Each relation of a FROM list is a join, planned as a tree as deep as the list is long.
                let relations: usize = select.from.iter().map(|t| 1 + t.joins.len()).sum();
                if relations > MAX_EXPRESSION_DEPTH {
                    return ControlFlow::Break(ParseError {
                        code: SqlState::STATEMENT_TOO_COMPLEX,
                        message: "statement is too complex".into(),
                        detail: Some(format!("Its FROM lists more than {MAX_EXPRESSION_DEPTH} relations.")),
                        position: None,
                    });
                }
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_statement(&mut self, statement: &ast::Statement) -> ControlFlow<ParseError> {
            if let ast::Statement::CreateTable(create) = statement
                && create.columns.len() > MAX_TABLE_COLUMNS
            {
                return ControlFlow::Break(too_wide(format!("tables can have at most {MAX_TABLE_COLUMNS} columns")));
            }
            ControlFlow::Continue(())
        }
    }
    fn too_wide(message: String) -> ParseError {
        ParseError { code: SqlState::TOO_MANY_COLUMNS, message, detail: None, position: None }
    }
    match statement.visit(&mut Width) {
        ControlFlow::Break(err) => Err(err),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Where an `EMIT ON WINDOW CLOSE` ended a statement that the input ends with.
const EOF_EMIT: Location = Location { line: 0, column: 0 };

/// Removes every `EMIT ON WINDOW CLOSE` that ends a statement (sqlparser does not know the clause), and returns the
/// location of the `;` after each, or [`EOF_EMIT`] for one at the end of the input.
fn strip_emit_clauses(tokens: Vec<TokenWithSpan>) -> (Vec<TokenWithSpan>, Vec<Location>) {
    let significant: Vec<usize> =
        (0..tokens.len()).filter(|&i| !matches!(tokens[i].token, Token::Whitespace(_))).collect();
    let mut drop = vec![false; tokens.len()];
    let mut emits = Vec::new();
    let is = |i: usize, word: &str| matches!(&tokens[i].token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word));
    for (n, window) in significant.windows(4).enumerate() {
        let [e, o, w, c] = [window[0], window[1], window[2], window[3]];
        if !(is(e, "EMIT") && is(o, "ON") && is(w, "WINDOW") && is(c, "CLOSE")) {
            continue;
        }
        // The tokenizer does not produce the end-of-input token: running out of tokens is the end.
        match significant.get(n + 4).map(|&after| &tokens[after]) {
            Some(TokenWithSpan { token: Token::SemiColon, span }) => emits.push(span.start),
            Some(TokenWithSpan { token: Token::EOF, .. }) | None => emits.push(EOF_EMIT),
            Some(_) => continue,
        }
        for i in [e, o, w, c] {
            drop[i] = true;
        }
    }
    let kept = tokens.into_iter().zip(drop).filter(|(_, d)| !d).map(|(t, _)| t).collect();
    (kept, emits)
}

/// The relation kind of a `SHOW CREATE ...` the parser stands at, and how many words name it.
fn at_show_create(parser: &Parser) -> Option<(RelationKind, usize)> {
    if !at_words(parser, &["SHOW", "CREATE"]) {
        return None;
    }
    [
        (&["SHOW", "CREATE", "MATERIALIZED", "VIEW"][..], RelationKind::MaterializedView),
        (&["SHOW", "CREATE", "SOURCE"][..], RelationKind::Source),
        (&["SHOW", "CREATE", "TABLE"][..], RelationKind::Table),
        (&["SHOW", "CREATE", "VIEW"][..], RelationKind::View),
    ]
    .into_iter()
    .find(|(words, _)| at_words(parser, words))
    .map(|(words, kind)| (kind, words.len()))
}

pub(crate) fn at_words(parser: &Parser, words: &[&str]) -> bool {
    words.iter().enumerate().all(|(n, word)| {
        matches!(&parser.peek_nth_token(n).token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
    })
}

/// `CREATE | ALTER` `USER | ROLE` name [WITH] option ...: the options Weir has are `LOGIN` (every user may log in),
/// `PASSWORD 'secret'` and `PASSWORD NULL`; the others are refused by name.
fn parse_user(parser: &mut Parser) -> Result<WeirStatement, ParserError> {
    let alter = matches!(&parser.next_token().token, Token::Word(w) if w.keyword == Keyword::ALTER);
    parser.next_token();
    let name = parser.parse_identifier()?;
    let _ = parser.parse_keyword(Keyword::WITH);
    let mut password = None;
    loop {
        let next = parser.peek_token();
        match &next.token {
            Token::Word(w) if w.keyword == Keyword::PASSWORD => {
                parser.next_token();
                password = Some(match parser.parse_keyword(Keyword::NULL) {
                    true => None,
                    false => Some(parser.parse_literal_string()?),
                });
            }
            Token::Word(w) if w.keyword == Keyword::LOGIN => {
                parser.next_token();
            }
            Token::Word(w) => {
                return Err(ParserError::ParserError(format!(
                    "role option {} is not supported; Weir's users take LOGIN and PASSWORD",
                    w.value.to_uppercase()
                )));
            }
            _ => break,
        }
    }
    Ok(WeirStatement::User { name, password, alter })
}

fn parse_drop_source(parser: &mut Parser) -> Result<WeirStatement, ParserError> {
    parser.next_token();
    parser.next_token();
    let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
    let names = parser.parse_comma_separated(|p| p.parse_object_name(false))?;
    let cascade = parser.parse_keyword(Keyword::CASCADE);
    if !cascade {
        let _ = parser.parse_keyword(Keyword::RESTRICT);
    }
    Ok(WeirStatement::DropSource { names, if_exists, cascade })
}

fn convert_error(sql: &str, tokens: &[TokenWithSpan], err: ParserError) -> ParseError {
    let message = match err {
        ParserError::RecursionLimitExceeded => {
            return ParseError {
                code: SqlState::STATEMENT_TOO_COMPLEX,
                message: "statement is too deeply nested".into(),
                detail: None,
                position: None,
            };
        }
        ParserError::TokenizerError(message) | ParserError::ParserError(message) => message,
    };
    // sqlparser appends " at Line: L, Column: C" to messages that carry a location.
    let (text, location) = match message.rsplit_once(" at Line: ") {
        Some((text, rest)) => (text.to_string(), parse_location(rest)),
        None => (message.clone(), None),
    };
    let detail = Some(text.clone());
    if location.is_none() && text.ends_with("found: EOF") {
        let eof = TokenWithSpan::wrap(Token::EOF);
        return syntax_error_at(sql, &eof, detail);
    }
    match location.and_then(|loc| tokens.iter().find(|t| t.span.start == loc)) {
        Some(token) => syntax_error_at(sql, token, detail),
        None => ParseError {
            code: SqlState::SYNTAX_ERROR,
            message: format!("syntax error: {}", lower_first(&text)),
            detail: None,
            position: location.and_then(|loc| char_position(sql, loc.line, loc.column)),
        },
    }
}

fn syntax_error_at(sql: &str, token: &TokenWithSpan, detail: Option<String>) -> ParseError {
    let message = match &token.token {
        Token::EOF => "syntax error at end of input".to_string(),
        other => format!("syntax error at or near \"{other}\""),
    };
    let position = match &token.token {
        // Postgres points just past the last character for "end of input".
        Token::EOF => Some(sql.chars().count() + 1),
        _ => char_position(sql, token.span.start.line, token.span.start.column),
    };
    ParseError { code: SqlState::SYNTAX_ERROR, message, detail, position }
}

fn parse_location(text: &str) -> Option<Location> {
    let (line, column) = text.split_once(", Column: ")?;
    Some(Location::new(line.trim().parse().ok()?, column.trim().parse().ok()?))
}

/// The text from `start` up to `end` (exclusive); `end` outside `sql` (the end-of-input token) means the end.
pub(crate) fn slice(sql: &str, start: Location, end: Location) -> &str {
    let from = byte_offset(sql, start).unwrap_or(sql.len());
    let to = byte_offset(sql, end).unwrap_or(sql.len());
    sql.get(from..to.max(from)).unwrap_or("")
}

/// The 0-based character offset of `location` in `sql`.
pub(crate) fn char_offset(sql: &str, location: Location) -> Option<usize> {
    char_position(sql, location.line, location.column).map(|p| p - 1)
}

fn byte_offset(sql: &str, location: Location) -> Option<usize> {
    let position = char_position(sql, location.line, location.column)?;
    // A position one past the last character is the end of the string.
    Some(sql.char_indices().nth(position - 1).map(|(i, _)| i).unwrap_or(sql.len()))
}

fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<String> {
        parse_sql(sql).unwrap().into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn splits_statements_keeping_their_text() {
        assert_eq!(
            texts("SELECT 1; select 'a;b' ;;\n INSERT INTO t VALUES (1)"),
            ["SELECT 1", "select 'a;b'", "INSERT INTO t VALUES (1)"]
        );
        assert!(texts(" ; ").is_empty());
    }

    #[test]
    fn syntax_error_points_at_the_token() {
        let err = parse_sql("SELECT 1;\nSELEC 2").unwrap_err();
        assert_eq!(err.code, SqlState::SYNTAX_ERROR);
        assert_eq!(err.message, "syntax error at or near \"SELEC\"");
        assert_eq!(err.position, Some(11));

        let err = parse_sql("SELECT * FROM t WHERE").unwrap_err();
        assert_eq!(err.message, "syntax error at end of input");
        assert_eq!(err.position, Some(22));

        let err = parse_sql("SELECT 1 2").unwrap_err();
        assert_eq!(err.message, "syntax error at or near \"2\"");
        assert_eq!(err.position, Some(10));
    }

    #[test]
    fn unterminated_string_is_a_syntax_error() {
        let err = parse_sql("SELECT 'abc").unwrap_err();
        assert_eq!(err.code, SqlState::SYNTAX_ERROR);
        assert!(err.message.starts_with("unterminated string literal"), "{}", err.message);
        assert_eq!(err.position, Some(8));
    }

    #[test]
    fn streaming_statements_parse() {
        let statements = parse_sql(
            "CREATE MATERIALIZED VIEW a AS SELECT window_end, count(*) FROM t GROUP BY window_end EMIT ON WINDOW CLOSE; \
             CREATE MATERIALIZED VIEW b AS SELECT * FROM t; FLUSH; DROP SOURCE IF EXISTS s, u CASCADE; \
             CREATE MATERIALIZED VIEW c AS SELECT * FROM t EMIT ON WINDOW CLOSE",
        )
        .unwrap();
        let shapes: Vec<String> = statements
            .iter()
            .map(|s| match &s.statement {
                WeirStatement::CreateMaterializedView { emit_on_window_close, .. } => {
                    format!("mv {emit_on_window_close}")
                }
                WeirStatement::Flush => "flush".into(),
                WeirStatement::DropSource { names, if_exists, cascade } => {
                    format!("drop {} {if_exists} {cascade}", names.len())
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(shapes, ["mv true", "mv false", "flush", "drop 2 true true", "mv true"]);
        assert!(statements[0].text.ends_with("GROUP BY window_end EMIT ON WINDOW CLOSE"), "{}", statements[0].text);
    }

    #[test]
    fn statements_nested_too_deep_are_54001_before_anything_builds_them() {
        let chain = |op: &str, n: usize| format!("SELECT {}", vec!["1"; n].join(op));
        assert!(parse_sql(&chain("+", MAX_EXPRESSION_DEPTH - 10)).is_ok());
        for sql in [
            chain("+", MAX_EXPRESSION_DEPTH + 10),
            chain(" AND ", 100_000),
            chain(" || ", 100_000),
            format!("SELECT 1{}", "::int".repeat(10_000)),
            format!(
                "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts PATTERN ({}A{}) DEFINE A AS true)",
                "(".repeat(10_000),
                ")".repeat(10_000)
            ),
        ] {
            let err = parse_sql(&sql).unwrap_err();
            assert_eq!(err.code, SqlState::STATEMENT_TOO_COMPLEX, "{}", &sql[..40]);
            assert_eq!(err.message, "statement is too complex");
            assert!(err.position.is_some());
        }
        // Wide is fine: a thousand columns of short expressions, an IN list of 100,000 values.
        let wide: Vec<String> = (0..MAX_SELECT_ITEMS).map(|i| format!("a + {i} AS c{i}")).collect();
        assert!(parse_sql(&format!("SELECT {} FROM t", wide.join(", "))).is_ok());
        let list: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        assert!(parse_sql(&format!("SELECT 1 WHERE x IN ({})", list.join(","))).is_ok());
        let err = parse_sql("SELECT 1 WHERE x = $2000000000").unwrap_err();
        assert_eq!((err.code, err.position), (SqlState::UNDEFINED_PARAMETER, Some(20)));
        assert!(parse_sql("SELECT $65535").is_ok());
        let wide: Vec<String> = (0..=MAX_SELECT_ITEMS).map(|i| i.to_string()).collect();
        assert_eq!(parse_sql(&format!("SELECT {}", wide.join(","))).unwrap_err().code, SqlState::TOO_MANY_COLUMNS);
        for sql in [
            "SELECT -0.5::numeric(4,4294967295)",
            "CREATE TABLE t (d DECIMAL(4, 4294967295))",
            "SELECT 1::decimal(0)",
            "SELECT 1::numeric(1001, 2)",
            "SELECT 1::numeric(5, 6)",
        ] {
            assert_eq!(parse_sql(sql).unwrap_err().code, SqlState::INVALID_PARAMETER_VALUE, "{sql}");
        }
        assert!(parse_sql("SELECT 1.5::numeric(10, 2), CAST(1 AS DECIMAL(38))").is_ok());
        // Depth adds up across groups: 20 groups of 100 operators each.
        let mut nested = String::from("1");
        for _ in 0..20 {
            nested = format!("({}+{nested})", vec!["1"; 100].join("+"));
        }
        assert_eq!(parse_sql(&format!("SELECT {nested}")).unwrap_err().code, SqlState::STATEMENT_TOO_COMPLEX);
    }

    #[test]
    fn long_runs_of_whitespace_parse_quickly() {
        let gap = "\n                       ".repeat(3000);
        let sql = format!(
            "CREATE SOURCE tracker (tag TEXT, at TIMESTAMPTZ,{gap} WATERMARK FOR at AS at - INTERVAL '1' SECOND) \
             WITH (connector = 'file', path = 'data/tracker.jsonl') FORMAT PLAIN ENCODE JSON"
        );
        let started = std::time::Instant::now();
        assert!(parse_sql(&sql).is_ok());
        let select = format!("SELECT 1,{gap} 2 FROM t WHERE a = 1{gap} AND b = 2");
        // Nested calls parse in time linear in their depth.
        let nested = format!("SELECT {}1{}", "abs(".repeat(150), ")".repeat(150));
        assert!(parse_sql(&nested).is_ok());
        let columns: Vec<String> = (0..1500).map(|i| format!("c{i} INT")).collect();
        assert!(parse_sql(&format!("CREATE TABLE wide ({})", columns.join(",\n    "))).is_ok());
        for deep in [
            format!("SELECT 1 {}", " UNION ALL SELECT 1".repeat(MAX_EXPRESSION_DEPTH + 1)),
            format!("SELECT 1 FROM t {}", " JOIN t USING (a)".repeat(MAX_EXPRESSION_DEPTH + 1)),
            format!("SELECT 1 FROM t{}", ", t".repeat(MAX_EXPRESSION_DEPTH + 1)),
        ] {
            assert_eq!(parse_sql(&deep).unwrap_err().code, SqlState::STATEMENT_TOO_COMPLEX);
        }
        assert!(parse_sql(&select).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[test]
    fn match_recognize_parses() {
        let sql = "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts MEASURES A.v AS v \
                   PATTERN (A B+) DEFINE B AS B.v > PREV(B.v))";
        assert_eq!(texts(sql).len(), 1);
    }
}
