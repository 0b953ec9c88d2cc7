//! `CREATE SINK`, which sqlparser does not know.
//!
//! ```text
//! CREATE SINK [IF NOT EXISTS] name
//!     { FROM relation | AS query }
//!     WITH (connector = '...', key = value [, ...])
//!     [FORMAT { PLAIN | UPSERT | DEBEZIUM } ENCODE JSON [(primary_key = 'column [, ...]')]]
//! ```
//!
//! Without `FORMAT`, a sink writes `FORMAT PLAIN ENCODE JSON`.

use datafusion::sql::sqlparser::ast::{ObjectName, Query};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::source::{FormatDef, parse_format, parse_option_list};

/// `CREATE SINK`, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSink {
    pub name: ObjectName,
    pub if_not_exists: bool,
    pub input: SinkInput,
    /// `WITH (...)` options in the order written; keys lower-cased.
    pub with: Vec<(String, String)>,
    pub format: Option<FormatDef>,
}

/// What a sink writes out.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkInput {
    /// `FROM relation`: a materialized view's (or a table's or a source's) rows and their changes.
    Relation(ObjectName),
    /// `AS query`: the rows of a query run as a streaming dataflow of the sink's own.
    Query(Box<Query>),
}

/// Whether the parser stands at `CREATE SINK`.
pub(crate) fn at_create_sink(parser: &Parser) -> bool {
    matches!(&parser.peek_nth_token(0).token, Token::Word(w) if w.keyword == Keyword::CREATE)
        && matches!(&parser.peek_nth_token(1).token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("SINK"))
}

/// Parses `CREATE SINK ...`; the parser stands at `CREATE`.
pub(crate) fn parse_create_sink(parser: &mut Parser) -> Result<CreateSink, ParserError> {
    parser.expect_keyword(Keyword::CREATE)?;
    // `SINK`, which sqlparser has no keyword for; `at_create_sink` checked it.
    parser.next_token();
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parser.parse_object_name(false)?;
    let input = if parser.parse_keyword(Keyword::FROM) {
        SinkInput::Relation(parser.parse_object_name(false)?)
    } else if parser.parse_keyword(Keyword::AS) {
        SinkInput::Query(parse_sink_query(parser)?)
    } else {
        return parser.expected("FROM relation or AS query", parser.peek_token());
    };
    if !parser.parse_keyword(Keyword::WITH) {
        return parser.expected("WITH (connector = '...', ...)", parser.peek_token());
    }
    let with = parse_option_list(parser)?;
    let format = parse_format(parser)?;
    Ok(CreateSink { name, if_not_exists, input, with, format })
}

/// The query of `CREATE SINK ... AS query WITH (...)`. It is parsed from the tokens before the sink's own `WITH (`
/// (the last one outside parentheses), since sqlparser would read `FROM t WITH (...)` as table hints.
fn parse_sink_query(parser: &mut Parser) -> Result<Box<Query>, ParserError> {
    let mut depth = 0usize;
    let mut sink_with = None;
    let mut n = 0;
    loop {
        match &parser.peek_nth_token(n).token {
            Token::EOF => break,
            Token::SemiColon if depth == 0 => break,
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            Token::Word(w)
                if depth == 0 && w.keyword == Keyword::WITH && parser.peek_nth_token(n + 1).token == Token::LParen =>
            {
                sink_with = Some(n);
            }
            _ => {}
        }
        n += 1;
    }
    let Some(end) = sink_with else { return parser.parse_query() };
    let tokens: Vec<_> = (0..end).map(|_| parser.next_token()).collect();
    let mut query = Parser::new(&crate::dialect::WEIR)
        .with_recursion_limit(crate::parse::RECURSION_LIMIT)
        .with_tokens_with_locations(tokens);
    let parsed = query.parse_query()?;
    let rest = query.peek_token();
    if rest.token != Token::EOF {
        return query.expected("WITH (connector = '...', ...)", rest);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use crate::parse::{WeirStatement, parse_sql};

    use super::*;

    fn sink(sql: &str) -> CreateSink {
        match parse_sql(sql).unwrap().remove(0).statement {
            WeirStatement::CreateSink(sink) => *sink,
            other => panic!("not a sink: {other:?}"),
        }
    }

    #[test]
    fn sinks_read_a_relation_or_a_query() {
        let from = sink(
            "CREATE SINK out FROM spend WITH (connector = 'kafka', topic = 't') \
             FORMAT UPSERT ENCODE JSON (primary_key = 'customer_id, window_end')",
        );
        assert_eq!(from.input, SinkInput::Relation(ObjectName::from(vec!["spend".into()])));
        let format = from.format.unwrap();
        assert_eq!((format.format.as_str(), format.encode.as_str()), ("UPSERT", "JSON"));
        assert_eq!(format.options, [("primary_key".to_string(), "customer_id, window_end".to_string())]);

        let query =
            sink("CREATE SINK IF NOT EXISTS hot AS SELECT * FROM readings WHERE temp > 30 WITH (connector = 'mqtt')");
        assert!(query.if_not_exists && query.format.is_none());
        let SinkInput::Query(query) = query.input else { panic!("not a query") };
        assert_eq!(query.to_string(), "SELECT * FROM readings WHERE temp > 30");

        // Without a WHERE, the sink's WITH is not the table's hints; a CTE and a parenthesized WITH inside stay.
        let bare = sink("CREATE SINK s AS SELECT * FROM t WITH (connector = 'kafka', topic = 'x')");
        assert_eq!(bare.with[0], ("connector".to_string(), "kafka".to_string()));
        let SinkInput::Query(query) = bare.input else { panic!("not a query") };
        assert_eq!(query.to_string(), "SELECT * FROM t");
        let cte = sink(
            "CREATE SINK s AS WITH x AS (SELECT * FROM t) SELECT * FROM x WITH (connector = 'mqtt') FORMAT PLAIN ENCODE JSON",
        );
        let SinkInput::Query(query) = cte.input else { panic!("not a query") };
        assert_eq!(query.to_string(), "WITH x AS (SELECT * FROM t) SELECT * FROM x");
        assert!(cte.format.is_some());
    }

    #[test]
    fn a_sink_needs_its_input_and_options() {
        let err = parse_sql("CREATE SINK out spend WITH (connector = 'kafka')").unwrap_err();
        assert_eq!(err.message, "syntax error at or near \"spend\"");
        assert!(parse_sql("CREATE SINK out FROM spend").is_err());
    }
}
