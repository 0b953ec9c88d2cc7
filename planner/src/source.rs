//! Weir's streaming DDL that sqlparser does not know: `CREATE SOURCE`, and `CREATE TABLE` with a watermark.
//!
//! ```text
//! CREATE SOURCE [IF NOT EXISTS] name (
//!     column type [PRIMARY KEY] [, ...]
//!     [, PRIMARY KEY (column [, ...])]
//!     [, WATERMARK FOR column AS expr]
//! )
//! [INCLUDE item [AS alias] [, ...]]          -- key, partition, offset, timestamp, topic, header 'name'
//! WITH (key = value [, ...])                   -- keys are identifiers, dotted names or quoted strings
//! [FORMAT format ENCODE encoding [(key = value [, ...])]]
//!
//! CREATE TABLE [IF NOT EXISTS] name (column type [, ...] [, PRIMARY KEY (...)], WATERMARK FOR column AS expr)
//! ```
//!
//! A `CREATE TABLE` without `WATERMARK` is sqlparser's statement; with one it is parsed here, as a table (rows come
//! from `INSERT`) with the same column list grammar as a source.
//!
//! The pieces sqlparser does know (column definitions, the watermark expression) are parsed with its parser, so types
//! and expressions mean the same here as everywhere else.

use datafusion::sql::sqlparser::ast::{ColumnDef, ColumnOption, Expr, Ident, ObjectName, Value};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};

/// `CREATE SOURCE`, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSource {
    /// `CREATE TABLE ... (..., WATERMARK FOR ...)`: a table, which has no connector.
    pub table: bool,
    pub name: ObjectName,
    pub if_not_exists: bool,
    pub columns: Vec<ColumnDef>,
    pub watermark: Option<WatermarkDef>,
    /// `PRIMARY KEY (column, ...)` (or `column type PRIMARY KEY`): each row is a version of its key, which a temporal
    /// join (`FOR SYSTEM_TIME AS OF`) joins. Not enforced otherwise.
    pub primary_key: Vec<Ident>,
    pub include: Vec<IncludeDef>,
    /// `WITH (...)` options in the order written; keys lower-cased.
    pub with: Vec<(String, String)>,
    pub format: Option<FormatDef>,
}

/// `WATERMARK FOR column AS expr`: the source's bound on disorder.
#[derive(Debug, Clone, PartialEq)]
pub struct WatermarkDef {
    pub column: Ident,
    pub expr: Expr,
}

/// One `INCLUDE` item: connector metadata exposed as a column.
#[derive(Debug, Clone, PartialEq)]
pub struct IncludeDef {
    /// `key`, `partition`, `offset`, `timestamp`, `topic` or `header`, lower-cased.
    pub item: String,
    /// The header name for `header 'name'`.
    pub argument: Option<String>,
    pub alias: Option<Ident>,
}

/// `FORMAT format ENCODE encoding (options)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatDef {
    /// Upper-cased: `PLAIN`, `UPSERT`, `DEBEZIUM`.
    pub format: String,
    /// Upper-cased: `JSON`, `CSV`, `AVRO`.
    pub encode: String,
    pub options: Vec<(String, String)>,
}

/// Whether the parser stands at `CREATE SOURCE`, or at a `CREATE TABLE` whose column list declares a watermark.
pub(crate) fn at_create_source(parser: &Parser, tokens: &[TokenWithSpan]) -> bool {
    if !is_keyword(&parser.peek_nth_token(0).token, Keyword::CREATE) {
        return false;
    }
    let second = parser.peek_nth_token(1).token;
    if is_keyword(&second, Keyword::SOURCE) {
        return true;
    }
    if !is_keyword(&second, Keyword::TABLE) {
        return false;
    }
    // `WATERMARK` directly inside the column list's parentheses, looked for in one pass over the tokens (peeking
    // at the n-th token from the parser each time would be quadratic in the statement's length).
    let mut depth = 0usize;
    for token in tokens.iter().skip(parser.index()) {
        match token.token {
            Token::LParen => depth += 1,
            Token::RParen if depth <= 1 => return false,
            Token::RParen => depth -= 1,
            Token::EOF | Token::SemiColon => return false,
            ref token if depth == 1 && is_word(token, "WATERMARK") => return true,
            _ => {}
        }
    }
    false
}

/// Parses `CREATE SOURCE ...` or `CREATE TABLE ...`; the parser stands at `CREATE`.
pub(crate) fn parse_create_source(parser: &mut Parser) -> Result<CreateSource, ParserError> {
    parser.expect_keyword(Keyword::CREATE)?;
    let table = parser.parse_keyword(Keyword::TABLE);
    if !table {
        parser.expect_keyword(Keyword::SOURCE)?;
    }
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parser.parse_object_name(false)?;

    parser.expect_token(&Token::LParen)?;
    let mut columns: Vec<ColumnDef> = Vec::new();
    let mut watermark = None;
    let mut primary_key = Vec::new();
    loop {
        if parser.parse_keywords(&[Keyword::PRIMARY, Keyword::KEY]) {
            if !primary_key.is_empty() {
                return parser.expected("one PRIMARY KEY", parser.peek_token());
            }
            primary_key = parser
                .parse_parenthesized_column_list(datafusion::sql::sqlparser::parser::IsOptional::Mandatory, false)?;
        } else if is_word(&parser.peek_token().token, "WATERMARK") {
            if watermark.is_some() {
                return parser.expected("one WATERMARK clause", parser.peek_token());
            }
            parser.next_token();
            parser.expect_keyword(Keyword::FOR)?;
            let column = parser.parse_identifier()?;
            parser.expect_keyword(Keyword::AS)?;
            let expr = parser.parse_expr()?;
            watermark = Some(WatermarkDef { column, expr });
        } else {
            columns.push(parser.parse_column_def()?);
        }
        if !parser.consume_token(&Token::Comma) {
            break;
        }
    }
    parser.expect_token(&Token::RParen)?;
    for column in &columns {
        let key = column.options.iter().any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)));
        if key {
            if !primary_key.is_empty() {
                return parser.expected("one PRIMARY KEY", parser.peek_token());
            }
            primary_key.push(column.name.clone());
        }
    }

    if table {
        let with = if parser.parse_keyword(Keyword::WITH) { parse_option_list(parser)? } else { vec![] };
        return Ok(CreateSource {
            table,
            name,
            if_not_exists,
            columns,
            watermark,
            primary_key,
            include: vec![],
            with,
            format: None,
        });
    }
    let mut include = Vec::new();
    if parser.parse_keyword(Keyword::INCLUDE) {
        include = parser.parse_comma_separated(parse_include)?;
    }
    if !parser.parse_keyword(Keyword::WITH) {
        return parser.expected("WITH (connector = '...', ...)", parser.peek_token());
    }
    let with = parse_option_list(parser)?;
    let format = parse_format(parser)?;
    Ok(CreateSource { table, name, if_not_exists, columns, watermark, primary_key, include, with, format })
}

/// An optional `FORMAT format ENCODE encoding [(options)]`.
pub(crate) fn parse_format(parser: &mut Parser) -> Result<Option<FormatDef>, ParserError> {
    if !parser.parse_keyword(Keyword::FORMAT) {
        return Ok(None);
    }
    let format = parse_word(parser, "a format such as PLAIN, UPSERT or DEBEZIUM")?;
    if !is_word(&parser.peek_token().token, "ENCODE") {
        return parser.expected("ENCODE", parser.peek_token());
    }
    parser.next_token();
    let encode = parse_word(parser, "an encoding such as JSON, CSV or AVRO")?;
    let options = if parser.peek_token().token == Token::LParen { parse_option_list(parser)? } else { vec![] };
    Ok(Some(FormatDef { format: format.to_uppercase(), encode: encode.to_uppercase(), options }))
}

fn parse_include(parser: &mut Parser) -> Result<IncludeDef, ParserError> {
    let item = parse_word(parser, "key, partition, offset, timestamp, topic or header")?.to_lowercase();
    let argument = match parser.peek_token().token {
        Token::SingleQuotedString(_) => Some(parser.parse_literal_string()?),
        _ => None,
    };
    let alias = if parser.parse_keyword(Keyword::AS) { Some(parser.parse_identifier()?) } else { None };
    Ok(IncludeDef { item, argument, alias })
}

/// `(key = value, ...)`. Keys may be identifiers, dotted identifiers (`nexmark.table`) or quoted strings.
pub(crate) fn parse_option_list(parser: &mut Parser) -> Result<Vec<(String, String)>, ParserError> {
    parser.expect_token(&Token::LParen)?;
    if parser.consume_token(&Token::RParen) {
        return Ok(vec![]);
    }
    let options = parser.parse_comma_separated(|parser| {
        let key = match parser.peek_token().token {
            Token::SingleQuotedString(_) => parser.parse_literal_string()?,
            _ => parser.parse_object_name(false)?.0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("."),
        };
        parser.expect_token(&Token::Eq)?;
        let value = match parser.peek_token().token {
            Token::Word(_) => parser.parse_identifier()?.value,
            _ => match parser.parse_value()?.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s,
                other => other.to_string(),
            },
        };
        Ok((key.to_lowercase(), value))
    })?;
    parser.expect_token(&Token::RParen)?;
    Ok(options)
}

fn parse_word(parser: &mut Parser, what: &str) -> Result<String, ParserError> {
    let token = parser.next_token();
    match &token.token {
        Token::Word(word) => Ok(word.value.clone()),
        _ => parser.expected(what, token),
    }
}

fn is_keyword(token: &Token, keyword: Keyword) -> bool {
    matches!(token, Token::Word(word) if word.keyword == keyword)
}

fn is_word(token: &Token, text: &str) -> bool {
    matches!(token, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(text))
}

#[cfg(test)]
mod tests {
    use crate::parse::{WeirStatement, parse_sql};

    use super::*;

    fn source(sql: &str) -> CreateSource {
        let mut statements = parse_sql(sql).unwrap();
        assert_eq!(statements.len(), 1);
        match statements.remove(0).statement {
            WeirStatement::CreateSource(source) => *source,
            other => panic!("not a CREATE SOURCE: {other:?}"),
        }
    }

    #[test]
    fn a_table_with_a_watermark_is_parsed_here_and_one_without_is_left_to_sqlparser() {
        let t = source("CREATE TABLE t (id INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)");
        assert!(t.table);
        assert_eq!(t.columns.len(), 2);
        assert_eq!(t.watermark.unwrap().column.value, "ts");
        let plain = parse_sql("CREATE TABLE t (id INT, note TEXT DEFAULT 'watermark', CHECK (id > 0))").unwrap();
        assert!(matches!(plain[0].statement, WeirStatement::Sql(_)));
    }

    #[test]
    fn parses_columns_watermark_options_and_format() {
        let s = source(
            "CREATE SOURCE IF NOT EXISTS readings (
               device_id TEXT, value DOUBLE PRECISION, ts TIMESTAMP(3),
               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
             ) WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:1883', topic = 'plant/+/readings', qos = 1)
             FORMAT PLAIN ENCODE JSON",
        );
        assert!(s.if_not_exists);
        assert_eq!(s.name.to_string(), "readings");
        let columns: Vec<String> = s.columns.iter().map(|c| format!("{} {}", c.name, c.data_type)).collect();
        assert_eq!(columns, ["device_id TEXT", "value DOUBLE PRECISION", "ts TIMESTAMP(3)"]);
        let watermark = s.watermark.unwrap();
        assert_eq!(watermark.column.value, "ts");
        assert_eq!(watermark.expr.to_string(), "ts - INTERVAL '5' SECOND");
        assert_eq!(
            s.with,
            [
                ("connector".to_string(), "mqtt".to_string()),
                ("url".to_string(), "mqtt://127.0.0.1:1883".to_string()),
                ("topic".to_string(), "plant/+/readings".to_string()),
                ("qos".to_string(), "1".to_string()),
            ]
        );
        let format = s.format.unwrap();
        assert_eq!((format.format.as_str(), format.encode.as_str()), ("PLAIN", "JSON"));
        assert!(format.options.is_empty());
    }

    #[test]
    fn parses_quoted_and_dotted_keys_include_and_encode_options() {
        let s = source(
            "CREATE SOURCE payments (customer_id TEXT, ts TIMESTAMPTZ)
             INCLUDE partition, offset, timestamp AS kafka_ts, header 'trace' AS trace_id
             WITH (connector = 'kafka', 'properties.bootstrap.server' = '127.0.0.1:9092', nexmark.table = 'bid')
             FORMAT upsert ENCODE json (primary_key = 'customer_id')",
        );
        assert!(s.watermark.is_none());
        let include: Vec<(String, Option<String>, Option<String>)> = s
            .include
            .iter()
            .map(|i| (i.item.clone(), i.argument.clone(), i.alias.as_ref().map(|a| a.value.clone())))
            .collect();
        assert_eq!(
            include,
            [
                ("partition".into(), None, None),
                ("offset".into(), None, None),
                ("timestamp".into(), None, Some("kafka_ts".into())),
                ("header".into(), Some("trace".into()), Some("trace_id".into())),
            ]
        );
        assert_eq!(s.with[1], ("properties.bootstrap.server".to_string(), "127.0.0.1:9092".to_string()));
        assert_eq!(s.with[2], ("nexmark.table".to_string(), "bid".to_string()));
        let format = s.format.unwrap();
        assert_eq!((format.format.as_str(), format.encode.as_str()), ("UPSERT", "JSON"));
        assert_eq!(format.options, [("primary_key".to_string(), "customer_id".to_string())]);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let err = parse_sql("CREATE SOURCE s (a INT) FORMAT PLAIN ENCODE JSON").unwrap_err();
        assert_eq!(err.message, "syntax error at or near \"FORMAT\"");
        assert_eq!(err.position, Some(25));
        assert_eq!(err.detail.as_deref(), Some("Expected: WITH (connector = '...', ...), found: FORMAT"));

        let err =
            parse_sql("CREATE SOURCE s (ts TIMESTAMP, WATERMARK ts AS ts) WITH (connector = 'datagen')").unwrap_err();
        assert_eq!(err.message, "syntax error at or near \"ts\"");
        assert_eq!(err.position, Some(42));

        let err = parse_sql("CREATE SOURCE s (a INT) WITH (connector = 'x') FORMAT PLAIN JSON").unwrap_err();
        assert_eq!(err.message, "syntax error at or near \"JSON\"");
    }
}
