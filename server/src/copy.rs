//! `COPY`, as Postgres clients use it to move rows in bulk.
//!
//! - [`CopyOptions`]: the statement's options (`WITH (FORMAT csv, HEADER, DELIMITER ';', NULL '', QUOTE, ESCAPE)`,
//!   or the pre-9.0 forms psql's `\copy` sends: `csv header`, `binary`, `delimiter ','`), read once and checked as
//!   Postgres checks them.
//! - [`CopyEncoder`]: a query's rows as `CopyData` messages, one row each (as Postgres sends them, and as psycopg's
//!   row parser expects), in the text, CSV or binary format. Values are the text (or binary) forms the wire gives
//!   them elsewhere, so `COPY (query) TO STDOUT` and the query print the same.
//! - [`CopyIn`]: the rows a client sends after `COPY table FROM STDIN`, text or CSV, split into records across
//!   `CopyData` boundaries, converted to the table's column types chunk by chunk, and held until the client says it
//!   is done: the rows reach the table all at once or not at all. A line that cannot be read stops the copy with
//!   Postgres' error and a `CONTEXT` naming the line and column; what is held is bounded by the statement memory
//!   limit.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder, new_null_array};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::sql::sqlparser::ast::{
    self, CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use pgwire::api::portal::Format;
use pgwire::api::results::FieldInfo;
use pgwire::error::PgWireResult;
use pgwire::types::format::FormatOptions;
use weir_common::{ErrorReport, SqlState};

use weir_common::catalog::RelationKind;

use crate::encode::{for_wire, pg_fields};
use crate::session::{Outcome, Session, normalize, object_name};

/// How rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// A `COPY` statement's options, with Postgres' defaults for its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    pub format: CopyFormat,
    pub header: bool,
    pub delimiter: u8,
    pub null: String,
    pub quote: u8,
    pub escape: u8,
}

impl CopyOptions {
    /// Reads the options of a `COPY` statement (both the parenthesized list and the legacy words).
    pub fn from_statement(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<Self, ErrorReport> {
        let mut format = CopyFormat::Text;
        let (mut header, mut delimiter, mut null, mut quote, mut escape) = (false, None, None, None, None);
        for option in options {
            match option {
                CopyOption::Format(name) => {
                    format = match name.value.to_ascii_lowercase().as_str() {
                        "text" => CopyFormat::Text,
                        "csv" => CopyFormat::Csv,
                        "binary" => CopyFormat::Binary,
                        other => {
                            return Err(ErrorReport::new(
                                SqlState::INVALID_PARAMETER_VALUE,
                                format!("COPY format \"{other}\" not recognized"),
                            ));
                        }
                    }
                }
                CopyOption::Header(on) => header = *on,
                CopyOption::Delimiter(c) => delimiter = Some(*c),
                CopyOption::Null(text) => null = Some(text.clone()),
                CopyOption::Quote(c) => quote = Some(*c),
                CopyOption::Escape(c) => escape = Some(*c),
                CopyOption::Encoding(name)
                    if name.eq_ignore_ascii_case("utf8") || name.eq_ignore_ascii_case("utf-8") => {}
                other => return Err(unsupported_option(&other.to_string())),
            }
        }
        for option in legacy {
            match option {
                CopyLegacyOption::Binary => format = CopyFormat::Binary,
                CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
                CopyLegacyOption::Null(text) => null = Some(text.clone()),
                CopyLegacyOption::Header => header = true,
                CopyLegacyOption::Csv(csv) => {
                    format = CopyFormat::Csv;
                    for option in csv {
                        match option {
                            CopyLegacyCsvOption::Header => header = true,
                            CopyLegacyCsvOption::Quote(c) => quote = Some(*c),
                            CopyLegacyCsvOption::Escape(c) => escape = Some(*c),
                            other => return Err(unsupported_option(&other.to_string())),
                        }
                    }
                }
                other => return Err(unsupported_option(&other.to_string())),
            }
        }
        let byte = |c: Option<char>, what: &str, default: u8| match c {
            None => Ok(default),
            Some(c) if c.is_ascii() => Ok(c as u8),
            Some(_) => Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("COPY {what} must be a single one-byte character"),
            )),
        };
        let csv = format == CopyFormat::Csv;
        if !csv && (quote.is_some() || escape.is_some()) {
            let what = if quote.is_some() { "quote" } else { "escape" };
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("COPY {what} available only in CSV mode"),
            ));
        }
        if format == CopyFormat::Binary && (delimiter.is_some() || null.is_some() || header) {
            return Err(ErrorReport::new(
                SqlState::SYNTAX_ERROR,
                "cannot specify DELIMITER, NULL or HEADER in BINARY mode",
            ));
        }
        let delimiter = byte(delimiter, "delimiter", if csv { b',' } else { b'\t' })?;
        let quote = byte(quote, "quote", b'"')?;
        let escape = byte(escape, "escape", quote)?;
        let null = null.unwrap_or_else(|| if csv { String::new() } else { "\\N".to_string() });
        if matches!(delimiter, b'\n' | b'\r') || (!csv && (delimiter == b'\\' || delimiter.is_ascii_alphanumeric())) {
            return Err(ErrorReport::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("COPY delimiter cannot be \"{}\"", (delimiter as char).escape_default()),
            ));
        }
        if csv && delimiter == quote {
            return Err(ErrorReport::new(
                SqlState::INVALID_PARAMETER_VALUE,
                "COPY delimiter and quote must be different",
            ));
        }
        if null.contains(['\n', '\r']) || null.as_bytes().contains(&delimiter) {
            return Err(ErrorReport::new(
                SqlState::INVALID_PARAMETER_VALUE,
                "COPY null representation cannot use newline, carriage return or the delimiter",
            ));
        }
        Ok(CopyOptions { format, header, delimiter, null, quote, escape })
    }

    /// The format code of `CopyOutResponse` / `CopyInResponse`: 0 text (text and CSV), 1 binary.
    pub fn wire_format(&self) -> i8 {
        i8::from(self.format == CopyFormat::Binary)
    }
}

fn unsupported_option(option: &str) -> ErrorReport {
    ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("COPY option {option} is not supported"))
}

/// The signature, flags and header extension length that start a binary `COPY` stream.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Writes a query's rows as `COPY ... TO STDOUT` data: one `CopyData` message per row.
#[derive(Debug)]
pub struct CopyEncoder {
    options: CopyOptions,
    fields: Arc<Vec<FieldInfo>>,
    /// What goes before the first row: the binary signature (in the first row's message, as Postgres sends it).
    prefix: Option<Bytes>,
}

impl CopyEncoder {
    /// `values` is how the session writes values (its `TimeZone`, ...).
    pub fn new(schema: &Schema, options: CopyOptions, values: Arc<FormatOptions>) -> PgWireResult<Self> {
        let format = match options.format {
            CopyFormat::Binary => Format::UnifiedBinary,
            CopyFormat::Text | CopyFormat::Csv => Format::UnifiedText,
        };
        let fields = Arc::new(pg_fields(schema, &format, Some(values))?);
        let prefix = (options.format == CopyFormat::Binary).then(|| Bytes::from_static(BINARY_SIGNATURE));
        Ok(CopyEncoder { options, fields, prefix })
    }

    pub fn columns(&self) -> usize {
        self.fields.len()
    }

    /// The header line (CSV and text with `HEADER`), its own message.
    pub fn header(&self) -> Option<Bytes> {
        if !self.options.header {
            return None;
        }
        let mut line = BytesMut::new();
        for (index, field) in self.fields.iter().enumerate() {
            if index > 0 {
                line.put_u8(self.options.delimiter);
            }
            self.put_text(&mut line, Some(field.name().as_bytes()));
        }
        line.put_u8(b'\n');
        Some(line.freeze())
    }

    /// One message per row of `batch`.
    pub fn encode(&mut self, batch: RecordBatch) -> PgWireResult<Vec<Bytes>> {
        let batch = for_wire(&self.fields, batch);
        let mut messages = Vec::with_capacity(batch.num_rows());
        for row in arrow_pg::datatypes::encode_recordbatch(self.fields.clone(), batch) {
            let row = row?;
            let mut message = BytesMut::with_capacity(row.data.len() + 16);
            if let Some(prefix) = self.prefix.take() {
                message.put_slice(&prefix);
            }
            match self.options.format {
                // A binary tuple is the field count and each field as a DataRow has it (length, bytes).
                CopyFormat::Binary => {
                    message.put_i16(row.field_count);
                    message.put_slice(&row.data);
                }
                CopyFormat::Text | CopyFormat::Csv => {
                    for (index, value) in data_row_fields(&row.data).enumerate() {
                        if index > 0 {
                            message.put_u8(self.options.delimiter);
                        }
                        self.put_text(&mut message, value);
                    }
                    message.put_u8(b'\n');
                }
            }
            messages.push(message.freeze());
        }
        Ok(messages)
    }

    /// What ends the data: the binary trailer (with the signature if no row came).
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.options.format != CopyFormat::Binary {
            return None;
        }
        let mut message = BytesMut::new();
        if let Some(prefix) = self.prefix.take() {
            message.put_slice(&prefix);
        }
        message.put_i16(-1);
        Some(message.freeze())
    }

    /// One value in the text or CSV format.
    fn put_text(&self, out: &mut BytesMut, value: Option<&[u8]>) {
        let options = &self.options;
        let Some(value) = value else {
            out.put_slice(options.null.as_bytes());
            return;
        };
        match options.format {
            CopyFormat::Csv => {
                let needs_quotes = value.is_empty() && options.null.is_empty()
                    || value == options.null.as_bytes()
                    || value == b"\\."
                    || value.iter().any(|&b| b == options.delimiter || b == options.quote || b == b'\n' || b == b'\r');
                if !needs_quotes {
                    out.put_slice(value);
                    return;
                }
                out.put_u8(options.quote);
                for &byte in value {
                    if byte == options.quote || byte == options.escape {
                        out.put_u8(options.escape);
                    }
                    out.put_u8(byte);
                }
                out.put_u8(options.quote);
            }
            CopyFormat::Text | CopyFormat::Binary => {
                for &byte in value {
                    match byte {
                        b'\\' => out.put_slice(b"\\\\"),
                        b'\n' => out.put_slice(b"\\n"),
                        b'\r' => out.put_slice(b"\\r"),
                        b'\t' => out.put_slice(b"\\t"),
                        byte if byte == options.delimiter => {
                            out.put_u8(b'\\');
                            out.put_u8(byte);
                        }
                        byte => out.put_u8(byte),
                    }
                }
            }
        }
    }
}

/// The values of a `DataRow`'s data: each a length (-1 for NULL) and its bytes.
fn data_row_fields(data: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (length, tail) = rest.split_first_chunk::<4>()?;
        let length = i32::from_be_bytes(*length);
        if length < 0 {
            rest = tail;
            return Some(None);
        }
        let (value, tail) = tail.split_at_checked(length as usize)?;
        rest = tail;
        Some(Some(value))
    })
}

/// Where a `COPY ... FROM STDIN` puts its rows: the table, its schema, and the table column of each input field.
#[derive(Debug, Clone)]
pub struct CopyInto {
    pub table: String,
    pub schema: SchemaRef,
    pub columns: Vec<usize>,
    pub options: CopyOptions,
    /// The most bytes of rows held until the copy ends.
    pub max_bytes: usize,
}

/// Rows per chunk converted to the table's types.
const CHUNK_ROWS: usize = 8192;

/// The rows of one `COPY ... FROM STDIN`, as they arrive.
#[derive(Debug)]
pub struct CopyIn {
    target: CopyInto,
    parser: RecordParser,
    /// The current chunk: each input field's values as text, and each row's line.
    texts: Vec<StringBuilder>,
    lines: Vec<u64>,
    batches: Vec<RecordBatch>,
    held: usize,
    header_left: bool,
    ended: bool,
    error: Option<ErrorReport>,
}

impl CopyIn {
    pub fn new(target: CopyInto) -> Self {
        let parser = RecordParser::new(&target.options);
        let texts = target.columns.iter().map(|_| StringBuilder::new()).collect();
        let header_left = target.options.header;
        CopyIn {
            target,
            parser,
            texts,
            lines: Vec::new(),
            batches: Vec::new(),
            held: 0,
            header_left,
            ended: false,
            error: None,
        }
    }

    pub fn target(&self) -> &CopyInto {
        &self.target
    }

    /// Takes one `CopyData` message. After an error the rest is read and ignored (the client sends it anyway);
    /// [`CopyIn::finish`] reports the error.
    pub fn feed(&mut self, data: &[u8]) {
        if self.error.is_some() || self.ended {
            return;
        }
        let mut records = Vec::new();
        self.parser.feed(data, &mut records);
        if let Err(err) = self.take(records) {
            self.error = Some(err);
        }
    }

    /// The rows, once the client has sent everything: all of them, or the first error.
    pub fn finish(mut self) -> Result<Vec<RecordBatch>, ErrorReport> {
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        let mut records = Vec::new();
        if !self.ended && !self.parser.end(&mut records) {
            return Err(ErrorReport::new(SqlState::BAD_COPY_FILE_FORMAT, "unterminated CSV quoted field")
                .with_context(format!("COPY {}, line {}", self.target.table, self.parser.record_line)));
        }
        self.take(records)?;
        self.convert()?;
        Ok(self.batches)
    }

    fn take(&mut self, records: Vec<Record>) -> Result<(), ErrorReport> {
        for record in records {
            if self.ended {
                break;
            }
            if record.is_end_marker() {
                self.ended = true;
                break;
            }
            if std::mem::take(&mut self.header_left) {
                continue;
            }
            self.push(record)?;
            if self.lines.len() >= CHUNK_ROWS {
                self.convert()?;
            }
        }
        Ok(())
    }

    fn push(&mut self, record: Record) -> Result<(), ErrorReport> {
        let table = &self.target.table;
        let context = || format!("COPY {table}, line {}", record.line);
        let expected = self.target.columns.len();
        if record.fields.len() > expected {
            return Err(ErrorReport::new(SqlState::BAD_COPY_FILE_FORMAT, "extra data after last expected column")
                .with_context(context()));
        }
        if record.fields.len() < expected {
            let missing = self.target.schema.field(self.target.columns[record.fields.len()]).name();
            return Err(ErrorReport::new(
                SqlState::BAD_COPY_FILE_FORMAT,
                format!("missing data for column \"{missing}\""),
            )
            .with_context(context()));
        }
        for (index, value) in record.fields.into_iter().enumerate() {
            let name = self.target.schema.field(self.target.columns[index]).name();
            match value {
                None => self.texts[index].append_null(),
                Some(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => self.texts[index].append_value(text),
                    Err(_) => {
                        return Err(ErrorReport::new(
                            SqlState::CHARACTER_NOT_IN_REPERTOIRE,
                            "invalid byte sequence for encoding \"UTF8\"",
                        )
                        .with_context(format!("{}, column {name}", context())));
                    }
                },
            }
        }
        self.lines.push(record.line);
        Ok(())
    }

    /// Converts the current chunk to the table's types.
    fn convert(&mut self) -> Result<(), ErrorReport> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.lines);
        let texts: Vec<ArrayRef> = self.texts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect();
        let schema = &self.target.schema;
        let mut columns: Vec<ArrayRef> =
            schema.fields().iter().map(|f| new_null_array(f.data_type(), lines.len())).collect();
        let strict = CastOptions { safe: false, ..CastOptions::default() };
        for (text, &column) in texts.iter().zip(&self.target.columns) {
            let field = schema.field(column);
            let converted = match field.data_type() {
                DataType::Utf8 => Ok(text.clone()),
                target => cast_with_options(text, target, &strict),
            };
            let converted = converted.map_err(|_| self.bad_value(text, column, &lines))?;
            if field.metadata().contains_key(weir_common::types::PG_JSON_KEY) {
                self.check_json(text, column, &lines)?;
            }
            if !field.is_nullable() && converted.null_count() > 0 {
                let row = (0..converted.len()).find(|&i| converted.is_null(i)).unwrap_or(0);
                return Err(ErrorReport::new(
                    SqlState::NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                        field.name(),
                        self.target.table
                    ),
                )
                .with_context(format!("COPY {}, line {}", self.target.table, lines[row])));
            }
            columns[column] = converted;
        }
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {e}")))?;
        self.held += batch.get_array_memory_size();
        if self.held > self.target.max_bytes {
            return Err(ErrorReport::new(
                SqlState::PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "COPY FROM STDIN holds its rows until the end, and these are more than {} bytes",
                    self.target.max_bytes
                ),
            )
            .with_hint("Split the input into several COPY statements."));
        }
        self.batches.push(batch);
        Ok(())
    }

    /// The error for the first value of `text` that does not convert to column `column`'s type.
    fn bad_value(&self, text: &ArrayRef, column: usize, lines: &[u64]) -> ErrorReport {
        let field = self.target.schema.field(column);
        let strict = CastOptions { safe: false, ..CastOptions::default() };
        let strings = text.as_any().downcast_ref::<datafusion::arrow::array::StringArray>();
        let bad = (0..text.len()).find(|&i| cast_with_options(&text.slice(i, 1), field.data_type(), &strict).is_err());
        let (row, value) = match (bad, strings) {
            (Some(row), Some(strings)) => (row, strings.value(row).to_string()),
            _ => (0, String::new()),
        };
        // Postgres names the type without its precision: `numeric`, `timestamp without time zone`.
        let type_name = weir_common::types::pg_type_name(field);
        let type_name = match (type_name.find('('), type_name.find(')')) {
            (Some(open), Some(close)) if open < close => format!("{}{}", &type_name[..open], &type_name[close + 1..]),
            _ => type_name,
        };
        let (code, message) = match field.data_type() {
            DataType::Timestamp(..)
            | DataType::Date32
            | DataType::Date64
            | DataType::Time32(_)
            | DataType::Time64(_) => {
                (SqlState::INVALID_DATETIME_FORMAT, format!("invalid input syntax for type {type_name}: \"{value}\""))
            }
            _ => (
                SqlState::INVALID_TEXT_REPRESENTATION,
                format!("invalid input syntax for type {type_name}: \"{value}\""),
            ),
        };
        ErrorReport::new(code, message).with_context(format!(
            "COPY {}, line {}, column {}: \"{value}\"",
            self.target.table,
            lines.get(row).copied().unwrap_or(0),
            field.name()
        ))
    }

    fn check_json(&self, text: &ArrayRef, column: usize, lines: &[u64]) -> Result<(), ErrorReport> {
        let Some(strings) = text.as_any().downcast_ref::<datafusion::arrow::array::StringArray>() else {
            return Ok(());
        };
        for (row, value) in strings.iter().enumerate() {
            let Some(value) = value else { continue };
            if serde_json::from_str::<serde::de::IgnoredAny>(value).is_err() {
                return Err(ErrorReport::new(
                    SqlState::INVALID_TEXT_REPRESENTATION,
                    "invalid input syntax for type json",
                )
                .with_context(format!(
                    "COPY {}, line {}, column {}: \"{value}\"",
                    self.target.table,
                    lines.get(row).copied().unwrap_or(0),
                    self.target.schema.field(column).name()
                )));
            }
        }
        Ok(())
    }
}

/// One record of the input: its fields (`None` for NULL) and the line it starts on.
#[derive(Debug, PartialEq)]
struct Record {
    fields: Vec<Option<Vec<u8>>>,
    line: u64,
    /// `\.` alone on a line: the end of the data.
    end: bool,
}

impl Record {
    fn is_end_marker(&self) -> bool {
        self.end
    }
}

/// Splits the input into records as it arrives, in the text or the CSV format; a record may span messages.
#[derive(Debug)]
struct RecordParser {
    csv: bool,
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: Vec<u8>,
    /// The record being read.
    fields: Vec<Option<Vec<u8>>>,
    field: Vec<u8>,
    /// Text format: the field as written (to compare with the NULL string). CSV: whether any of it was quoted.
    raw: Vec<u8>,
    quoted: bool,
    /// CSV: a carriage return outside quotes, kept back until the next byte shows whether it ends the line.
    carriage_return: bool,
    state: State,
    line: u64,
    record_line: u64,
    /// Whether the record has any byte yet (an empty last line is no record).
    started: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Plain,
    /// Text: after a backslash. CSV: inside quotes.
    Escaped,
    InQuotes,
    /// CSV inside quotes, after an escape character that is not the quote.
    QuotedEscape,
    /// CSV inside quotes, after a quote that may be the first of a doubled pair.
    QuoteInQuotes,
}

impl RecordParser {
    fn new(options: &CopyOptions) -> Self {
        RecordParser {
            csv: options.format == CopyFormat::Csv,
            delimiter: options.delimiter,
            quote: options.quote,
            escape: options.escape,
            null: options.null.as_bytes().to_vec(),
            fields: Vec::new(),
            field: Vec::new(),
            raw: Vec::new(),
            quoted: false,
            carriage_return: false,
            state: State::Plain,
            line: 1,
            record_line: 1,
            started: false,
        }
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<Record>) {
        for &byte in data {
            self.byte(byte, out);
        }
    }

    /// The input ended: a last record without its newline. `false` if it ends inside a quoted CSV field.
    fn end(&mut self, out: &mut Vec<Record>) -> bool {
        if matches!(self.state, State::InQuotes | State::QuotedEscape) {
            return false;
        }
        if self.started {
            self.end_record(out);
        }
        true
    }

    fn byte(&mut self, byte: u8, out: &mut Vec<Record>) {
        self.started = true;
        if self.csv {
            self.csv_byte(byte, out);
        } else {
            self.text_byte(byte, out);
        }
    }

    fn text_byte(&mut self, byte: u8, out: &mut Vec<Record>) {
        match self.state {
            State::Escaped => {
                self.raw.push(byte);
                self.state = State::Plain;
                let unescaped = match byte {
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'v' => 0x0b,
                    other => other,
                };
                self.field.push(unescaped);
            }
            _ if byte == b'\\' => {
                self.raw.push(byte);
                self.state = State::Escaped;
            }
            _ if byte == self.delimiter => self.end_field(),
            _ if byte == b'\n' => {
                if self.raw.last() == Some(&b'\r') && self.field.last() == Some(&b'\r') {
                    self.raw.pop();
                    self.field.pop();
                }
                self.end_record(out);
                self.line += 1;
            }
            _ => {
                self.raw.push(byte);
                self.field.push(byte);
            }
        }
    }

    fn csv_byte(&mut self, byte: u8, out: &mut Vec<Record>) {
        if byte == b'\n' {
            self.line += 1;
        }
        match self.state {
            State::InQuotes if byte == self.escape && self.escape != self.quote => self.state = State::QuotedEscape,
            State::InQuotes if byte == self.quote => self.state = State::QuoteInQuotes,
            State::InQuotes => self.field.push(byte),
            State::QuotedEscape => {
                if byte != self.quote && byte != self.escape {
                    self.field.push(self.escape);
                }
                self.field.push(byte);
                self.state = State::InQuotes;
            }
            State::QuoteInQuotes if byte == self.quote => {
                self.field.push(byte);
                self.state = State::InQuotes;
            }
            State::QuoteInQuotes | State::Plain | State::Escaped => {
                self.state = State::Plain;
                // A carriage return before the newline ends the line with it (CRLF input).
                if std::mem::take(&mut self.carriage_return) && byte != b'\n' {
                    self.field.push(b'\r');
                }
                if byte == b'\r' {
                    self.carriage_return = true;
                } else if byte == self.quote {
                    self.quoted = true;
                    self.state = State::InQuotes;
                } else if byte == self.delimiter {
                    self.end_field();
                } else if byte == b'\n' {
                    // The newline was counted above; the record started on the line before.
                    self.end_record(out);
                } else {
                    self.field.push(byte);
                }
            }
        }
    }

    fn end_field(&mut self) {
        let field = std::mem::take(&mut self.field);
        let raw = std::mem::take(&mut self.raw);
        let null = match self.csv {
            true => !self.quoted && field == self.null,
            false => raw == self.null,
        };
        self.quoted = false;
        self.fields.push((!null).then_some(field));
    }

    fn end_record(&mut self, out: &mut Vec<Record>) {
        let end = self.fields.is_empty()
            && match self.csv {
                true => !self.quoted && self.field == b"\\.",
                false => self.raw == b"\\.",
            };
        self.end_field();
        let fields = std::mem::take(&mut self.fields);
        out.push(Record { fields, line: self.record_line, end });
        self.record_line = if self.csv { self.line } else { self.line + 1 };
        self.started = false;
        self.carriage_return = false;
        self.state = State::Plain;
    }
}

impl Session {
    /// Runs a `COPY` statement: the rows out (computed as the client reads them), or the table ready to take rows.
    pub(crate) async fn copy(&self, statement: &Statement, text: &str, sql: &str) -> Result<Outcome, ErrorReport> {
        let Statement::Copy { source, to, target, options, legacy_options, values } = statement else {
            return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a COPY"));
        };
        let options = CopyOptions::from_statement(options, legacy_options)?;
        match (target, *to) {
            (CopyTarget::Stdout, true) => {
                let query = match source {
                    CopySource::Query(query) => Statement::Query(query.clone()),
                    CopySource::Table { table_name, columns } => {
                        let list = match columns.is_empty() {
                            true => "*".to_string(),
                            false => columns.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        };
                        select_from(&format!("SELECT {list} FROM {table_name}"))?
                    }
                };
                let plan = self.plan(query, text, sql).await?;
                self.check_plan(&plan)?;
                let df =
                    self.ctx.execute_logical_plan(plan).await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
                Ok(Outcome::CopyOut(df, options))
            }
            (CopyTarget::Stdin, false) => {
                let CopySource::Table { table_name, columns } = source else {
                    return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "COPY FROM takes a table, not a query"));
                };
                if !values.is_empty() {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "COPY FROM STDIN must be the last statement of its query string",
                    ));
                }
                if options.format == CopyFormat::Binary {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "COPY FROM STDIN takes the text and CSV formats",
                    ));
                }
                let target = self.copy_target(table_name, columns, options)?;
                Ok(Outcome::CopyIn(Box::new(target)))
            }
            (CopyTarget::File { .. } | CopyTarget::Program { .. }, _) => Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "COPY to or from a file or program on the server is not supported",
            )
            .with_hint("Use COPY ... TO STDOUT or FROM STDIN (psql's \\copy reads and writes files where psql runs).")),
            _ => Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "COPY TO goes to STDOUT and COPY FROM reads STDIN")),
        }
    }

    /// The table a `COPY FROM STDIN` writes, checked: it exists, is a table, the user may insert into it, and its
    /// columns are named once each.
    fn copy_target(
        &self,
        table_name: &ast::ObjectName,
        columns: &[ast::Ident],
        options: CopyOptions,
    ) -> Result<CopyInto, ErrorReport> {
        let name = object_name(table_name)?;
        let relation = self.engine.catalog.get(&name).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
        })?;
        if relation.def.kind != RelationKind::Table || relation.source.is_some() {
            return Err(ErrorReport::new(
                SqlState::WRONG_OBJECT_TYPE,
                format!("cannot copy to {} \"{name}\"", relation.def.kind),
            )
            .with_hint(
                "COPY FROM writes tables; the rows of sources and views come from their connectors and queries.",
            ));
        }
        self.check_insert(&name)?;
        let schema = relation.def.schema.clone();
        let columns = match columns.is_empty() {
            true => (0..schema.fields().len()).collect(),
            false => {
                let mut indices = Vec::with_capacity(columns.len());
                for column in columns {
                    let column = normalize(column);
                    let index = schema.index_of(&column).map_err(|_| {
                        ErrorReport::new(
                            SqlState::UNDEFINED_COLUMN,
                            format!("column \"{column}\" of relation \"{name}\" does not exist"),
                        )
                    })?;
                    if indices.contains(&index) {
                        return Err(ErrorReport::new(
                            SqlState::DUPLICATE_COLUMN,
                            format!("column \"{column}\" specified more than once"),
                        ));
                    }
                    indices.push(index);
                }
                indices
            }
        };
        let max_bytes = self.engine.limits.query_memory_bytes;
        Ok(CopyInto { table: name, schema, columns, options, max_bytes })
    }

    /// Writes the rows of a finished `COPY FROM STDIN` into its table, all at once; returns how many.
    pub(crate) async fn copy_in(&self, target: &CopyInto, batches: Vec<RecordBatch>) -> Result<usize, ErrorReport> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return Ok(0);
        }
        // Checked again: the table may have gone, or the grant been revoked, while the rows came.
        let table = ast::ObjectName::from(vec![ast::Ident::with_quote('"', target.table.clone())]);
        self.copy_target(&table, &[], target.options.clone())?;
        let df = self.ctx.read_batches(batches).map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        df.write_table(&target.table, DataFrameWriteOptions::new())
            .await
            .map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        Ok(rows)
    }
}

/// The statement of a `SELECT` Weir writes itself.
fn select_from(text: &str) -> Result<Statement, ErrorReport> {
    let mut statements = weir_planner::parse_sql(text)?;
    match statements.pop().map(|s| s.statement) {
        Some(weir_planner::WeirStatement::Sql(statement)) => Ok(*statement),
        _ => Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a query")),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{AsArray, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Int64Type};
    use datafusion::sql::sqlparser::ast::Ident;

    use super::*;

    fn text() -> CopyOptions {
        CopyOptions::from_statement(&[], &[]).expect("defaults")
    }

    fn csv() -> CopyOptions {
        CopyOptions::from_statement(&[CopyOption::Format(Ident::new("csv"))], &[]).expect("csv")
    }

    fn records(options: &CopyOptions, chunks: &[&[u8]]) -> Vec<Record> {
        let mut parser = RecordParser::new(options);
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        assert!(parser.end(&mut out), "the input ends inside quotes");
        out
    }

    fn values(record: &Record) -> Vec<Option<&str>> {
        record.fields.iter().map(|f| f.as_deref().map(|b| std::str::from_utf8(b).expect("utf-8"))).collect()
    }

    #[test]
    fn options_take_postgres_defaults_and_refuse_what_postgres_refuses() {
        assert_eq!(
            text(),
            CopyOptions {
                format: CopyFormat::Text,
                header: false,
                delimiter: b'\t',
                null: "\\N".into(),
                quote: b'"',
                escape: b'"'
            }
        );
        let csv = csv();
        assert_eq!((csv.delimiter, csv.null.as_str(), csv.quote, csv.escape), (b',', "", b'"', b'"'));
        // psql's `\copy t from 'f' csv header` sends the legacy form.
        let legacy = CopyOptions::from_statement(&[], &[CopyLegacyOption::Csv(vec![CopyLegacyCsvOption::Header])])
            .expect("legacy");
        assert_eq!((legacy.format, legacy.header), (CopyFormat::Csv, true));
        let err = CopyOptions::from_statement(&[CopyOption::Quote('\'')], &[]).unwrap_err();
        assert_eq!(err.message, "COPY quote available only in CSV mode");
        let err = CopyOptions::from_statement(&[CopyOption::Format(Ident::new("parquet"))], &[]).unwrap_err();
        assert_eq!(err.message, "COPY format \"parquet\" not recognized");
        let err =
            CopyOptions::from_statement(&[CopyOption::Format(Ident::new("binary")), CopyOption::Header(true)], &[])
                .unwrap_err();
        assert_eq!(err.code, SqlState::SYNTAX_ERROR);
        let err =
            CopyOptions::from_statement(&[CopyOption::Format(Ident::new("csv")), CopyOption::Delimiter('"')], &[])
                .unwrap_err();
        assert_eq!(err.message, "COPY delimiter and quote must be different");
    }

    #[test]
    fn text_records_unescape_and_know_null_from_the_written_form() {
        // Tab-separated; `\N` is NULL, `\\N` is the text \N; escapes decode; a record may span messages.
        let input: &[&[u8]] = &[b"1\ta\\tb\t\\N\n2\t\\\\N\tx", b"\\ny\r\n\\.\nignored\n"];
        let records = records(&text(), input);
        // The parser reads on after the end marker; the copy stops at it.
        assert_eq!(records.len(), 4);
        assert_eq!(values(&records[0]), vec![Some("1"), Some("a\tb"), None]);
        assert_eq!(values(&records[1]), vec![Some("2"), Some("\\N"), Some("x\ny")]);
        assert_eq!(records[1].line, 2);
        assert!(records[2].is_end_marker());
    }

    #[test]
    fn csv_records_quote_double_and_span_lines() {
        // `""` inside quotes is one quote; a quoted field may hold the delimiter and newlines; an unquoted empty field
        // is NULL, a quoted one the empty string.
        let input: &[&[u8]] = &[b"1,\"a,\"\"b\"\"\",\n2,\"line", b" one\nline two\",\"\"\r\n3,plain,x\n"];
        let parsed = records(&csv(), input);
        assert_eq!(parsed.len(), 3);
        assert_eq!(values(&parsed[0]), vec![Some("1"), Some("a,\"b\""), None]);
        assert_eq!(values(&parsed[1]), vec![Some("2"), Some("line one\nline two"), Some("")]);
        assert_eq!((parsed[0].line, parsed[1].line, parsed[2].line), (1, 2, 4));
        assert_eq!(values(&parsed[2]), vec![Some("3"), Some("plain"), Some("x")]);
        // A last line without its newline is a record; an escape other than the quote escapes the quote.
        let options =
            CopyOptions::from_statement(&[CopyOption::Format(Ident::new("csv")), CopyOption::Escape('\\')], &[])
                .expect("escape");
        let escaped = records(&options, &[b"\"say \\\"hi\\\"\",\\n"]);
        assert_eq!(values(&escaped[0]), vec![Some("say \"hi\""), Some("\\n")]);
    }

    fn table() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Int64, true),
        ]))
    }

    fn copy_in(columns: Vec<usize>, options: CopyOptions) -> CopyIn {
        CopyIn::new(CopyInto { table: "t".into(), schema: table(), columns, options, max_bytes: 1 << 30 })
    }

    #[test]
    fn rows_take_the_table_types_and_missing_columns_are_null() {
        let mut copy = copy_in(vec![0, 1], csv());
        copy.feed(b"1,ann\n2,");
        copy.feed(b"\n");
        let batches = copy.finish().expect("rows");
        assert_eq!(batches.len(), 1);
        let ids: &Int64Array = batches[0].column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.values().to_vec(), vec![1, 2]);
        let names: &StringArray = batches[0].column(1).as_string::<i32>();
        assert_eq!((names.value(0), names.is_null(1)), ("ann", true));
        assert_eq!(batches[0].column(2).null_count(), 2);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_line_and_column() {
        let header = CopyOptions { header: true, ..csv() };
        let mut copy = copy_in(vec![0, 1, 2], header);
        copy.feed(b"id,name,score\n1,a,10\n2,b,x7\n3,c,30\n");
        let err = copy.finish().unwrap_err();
        assert_eq!(err.code, SqlState::INVALID_TEXT_REPRESENTATION);
        assert_eq!(err.message, "invalid input syntax for type bigint: \"x7\"");
        assert_eq!(err.context.as_deref(), Some("COPY t, line 3, column score: \"x7\""));

        let mut copy = copy_in(vec![0, 1, 2], text());
        copy.feed(b"1\ta\t1\n2\tb\n");
        let err = copy.finish().unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (SqlState::BAD_COPY_FILE_FORMAT, "missing data for column \"score\"")
        );
        assert_eq!(err.context.as_deref(), Some("COPY t, line 2"));

        let mut copy = copy_in(vec![0, 1, 2], text());
        copy.feed(b"\\N\ta\t1\n");
        let err = copy.finish().unwrap_err();
        assert_eq!(err.code, SqlState::NOT_NULL_VIOLATION);
    }

    #[test]
    fn rows_beyond_the_bound_are_refused() {
        let mut copy = CopyIn::new(CopyInto {
            table: "t".into(),
            schema: table(),
            columns: vec![0],
            options: text(),
            max_bytes: 1024,
        });
        let input: String = (0..20_000).map(|n| format!("{n}\n")).collect();
        copy.feed(input.as_bytes());
        assert_eq!(copy.finish().unwrap_err().code, SqlState::PROGRAM_LIMIT_EXCEEDED);
    }

    fn encoded(options: CopyOptions, batch: RecordBatch) -> Vec<Vec<u8>> {
        let mut encoder = CopyEncoder::new(&batch.schema(), options, Arc::default()).expect("encoder");
        let mut out: Vec<Vec<u8>> = encoder.header().into_iter().map(|b| b.to_vec()).collect();
        out.extend(encoder.encode(batch).expect("rows").into_iter().map(|b| b.to_vec()));
        out.extend(encoder.finish().map(|b| b.to_vec()));
        out
    }

    fn sample() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let ids = Int64Array::from(vec![Some(1), None]);
        let notes = StringArray::from(vec![Some("a,\"b\"\tc\nd"), Some("")]);
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(notes)]).expect("batch")
    }

    #[test]
    fn rows_are_written_as_postgres_writes_them() {
        let text_rows = encoded(text(), sample());
        assert_eq!(text_rows, vec![b"1\ta,\"b\"\\tc\\nd\n".to_vec(), b"\\N\t\n".to_vec()]);
        let csv_rows = encoded(CopyOptions { header: true, ..csv() }, sample());
        assert_eq!(csv_rows, vec![b"id,note\n".to_vec(), b"1,\"a,\"\"b\"\"\tc\nd\"\n".to_vec(), b",\"\"\n".to_vec()]);
        // Binary: signature with the first tuple, each tuple its field count and (length, bytes) fields, the trailer.
        let binary = CopyOptions::from_statement(&[CopyOption::Format(Ident::new("binary"))], &[]).expect("binary");
        let rows = encoded(binary, sample());
        let mut first = BINARY_SIGNATURE.to_vec();
        first.extend([0, 2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9]);
        first.extend(b"a,\"b\"\tc\nd");
        assert_eq!(rows[0], first);
        assert_eq!(rows[1], vec![0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(rows[2], vec![0xff, 0xff]);
    }
}
