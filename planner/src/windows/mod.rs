//! Event-time windows in SQL: the window table functions and the legacy group windows.
//!
//! - `FROM TUMBLE(t, ts, size [, offset])`, `FROM HOP(t, ts, slide, size [, offset])`,
//!   `FROM CUMULATE(t, ts, step, size [, offset])` and `FROM SESSION(t, ts, gap [, key ...])` add `window_start`,
//!   `window_end` and `window_time` to every row of `t` (one row per window the row falls in; sessions are kept apart
//!   per key). Flink's form `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), ...))`, and
//!   `TABLE(SESSION(TABLE t PARTITION BY k, DESCRIPTOR(ts), gap))`, is turned into the short form by [`flink_form`]
//!   before parsing.
//! - Legacy group windows (`GROUP BY k, TUMBLE(ts, size)`, `HOP(ts, slide, size)`, `SESSION(ts, gap)`, with
//!   `*_START`, `*_END` and `*_ROWTIME`) over a single table become the window table function over that table grouped
//!   by `window_start, window_end` (sessions kept apart per the other group keys, as Flink's keyed group windows
//!   are). A tumbling group window over anything else (a join, a subquery) groups on the window start instead.
//!
//! [`rewrite_windows`] rewrites both into plain SQL over the [`functions`], which DataFusion plans and runs. Window
//! assignment stays visible in the plan as those function calls.

pub mod functions;
pub mod session;

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, ObjectName, Query, SetExpr, Statement,
    TableFactor, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};
pub use functions::{WindowKind, window_udfs};
pub use session::session_udwfs;
use weir_common::{ErrorReport, SqlState};

use crate::dialect::WEIR;

/// Rewrites window table functions and legacy group windows in `statement` into SQL DataFusion plans.
pub fn rewrite_windows(statement: &mut Statement) -> Result<(), ErrorReport> {
    match statement.visit(&mut Rewriter) {
        ControlFlow::Break(err) => Err(err),
        ControlFlow::Continue(()) => Ok(()),
    }
}

struct Rewriter;

impl VisitorMut for Rewriter {
    type Break = ErrorReport;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<ErrorReport> {
        match group_window_over_table(query) {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => ControlFlow::Break(err),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<ErrorReport> {
        let TableFactor::Table { name, args: Some(args), alias, .. } = factor else {
            return ControlFlow::Continue(());
        };
        let Some(kind) = window_tvf(name) else {
            return ControlFlow::Continue(());
        };
        let args: Vec<&Expr> = args.args.iter().filter_map(positional).collect();
        let alias_sql = alias.as_ref().map(|a| a.name.to_string());
        match derived_table(kind, &args, alias_sql) {
            Ok(derived) => {
                *factor = derived;
                ControlFlow::Continue(())
            }
            Err(err) => ControlFlow::Break(err),
        }
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<ErrorReport> {
        let Expr::Function(function) = expr else {
            return ControlFlow::Continue(());
        };
        let name = last_part(&function.name).to_ascii_uppercase();
        let FunctionArguments::List(list) = &function.args else {
            return ControlFlow::Continue(());
        };
        let args: Vec<&Expr> = list.args.iter().filter_map(positional).collect();
        let replacement = match name.as_str() {
            "TUMBLE" | "TUMBLE_START" | "TUMBLE_END" | "TUMBLE_ROWTIME" => {
                if !(2..=3).contains(&args.len()) {
                    return ControlFlow::Break(usage(&name, "(time_column, size [, offset])"));
                }
                let start = format!("weir_tumble_start({})", join(&args));
                match name.as_str() {
                    "TUMBLE" | "TUMBLE_START" => start,
                    "TUMBLE_END" => format!("{start} + {}", args[1]),
                    _ => format!("weir_prev_instant({start} + {})", args[1]),
                }
            }
            "HOP" | "HOP_START" | "HOP_END" | "HOP_ROWTIME" | "SESSION" | "SESSION_START" | "SESSION_END"
            | "SESSION_ROWTIME" => {
                return ControlFlow::Break(
                    ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!("{name} as a group window over anything but one table is not supported"),
                    )
                    .with_hint("Use the window table function in FROM, e.g. FROM HOP(t, ts, slide, size)."),
                );
            }
            _ => return ControlFlow::Continue(()),
        };
        match parse_expr(&replacement) {
            Ok(new) => {
                *expr = new;
                ControlFlow::Continue(())
            }
            Err(err) => ControlFlow::Break(err),
        }
    }
}

/// Rewrites a legacy group window (`... FROM t GROUP BY k, HOP(ts, slide, size)`) over a single table into the window
/// table function over it, grouped by `window_start, window_end`, with `HOP_START(...)` and the like replaced by the
/// window columns. Anything else is left alone.
fn group_window_over_table(query: &mut Query) -> Result<(), ErrorReport> {
    let SetExpr::Select(select) = query.body.as_mut() else { return Ok(()) };
    let GroupByExpr::Expressions(group_by, _) = &mut select.group_by else { return Ok(()) };
    let windows: Vec<(usize, Tvf, Vec<Expr>)> = group_by
        .iter()
        .enumerate()
        .filter_map(|(at, expr)| {
            let Expr::Function(function) = expr else { return None };
            let FunctionArguments::List(list) = &function.args else { return None };
            let args = list.args.iter().filter_map(positional).cloned().collect();
            window_tvf(&function.name).map(|kind| (at, kind, args))
        })
        .collect();
    let Some((at, kind, args)) = windows.first().cloned() else { return Ok(()) };
    if windows.len() > 1 {
        return Err(ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, "more than one group window is not supported"));
    }
    let [from] = select.from.as_slice() else { return Ok(()) };
    let TableFactor::Table { name, alias, args: None, .. } = &from.relation else { return Ok(()) };
    if !from.joins.is_empty() || kind == Tvf::Cumulate {
        return Ok(());
    }
    let (function, form, sizes) = match kind {
        Tvf::Tumble => ("TUMBLE", "(time_column, size [, offset])", 1..=2),
        Tvf::Hop => ("HOP", "(time_column, slide, size [, offset])", 2..=3),
        Tvf::Session => ("SESSION", "(time_column, gap)", 1..=1),
        Tvf::Cumulate => return Ok(()),
    };
    if !sizes.contains(&(args.len().saturating_sub(1))) || !is_column(&args[0]) {
        return Err(usage(function, form));
    }
    let others: Vec<Expr> = group_by.iter().enumerate().filter(|(i, _)| *i != at).map(|(_, e)| e.clone()).collect();
    let mut tvf_args: Vec<String> = std::iter::once(name.to_string()).chain(args.iter().map(Expr::to_string)).collect();
    if kind == Tvf::Session {
        // Flink's keyed session group windows: sessions per value of the other group keys.
        if let Some(key) = others.iter().find(|k| !is_column(k)) {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("a SESSION group window next to the group expression {key} is not supported"),
            )
            .with_hint("Group by columns, or compute the expression in a subquery first."));
        }
        tvf_args.extend(others.iter().map(Expr::to_string));
    }
    let alias_sql = alias.as_ref().map(|a| format!(" AS {}", a.name)).unwrap_or_default();
    let sql = format!("SELECT * FROM {function}({}){alias_sql}", tvf_args.join(", "));
    let mut parsed = Parser::new(&WEIR).try_with_sql(&sql).and_then(|mut p| p.parse_query()).map_err(|e| {
        ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: group window rewrite: {e}: {sql}"))
    })?;
    let SetExpr::Select(parsed) = parsed.body.as_mut() else {
        return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: group window rewrite"));
    };
    let relation = parsed.from.remove(0).relation;
    select.from[0].relation = relation;
    group_by
        .splice(at..=at, [Expr::Identifier(Ident::new("window_start")), Expr::Identifier(Ident::new("window_end"))]);
    let _ = query.visit(&mut WindowColumns(function));
    Ok(())
}

/// Replaces `{PREFIX}_START(...)`, `_END(...)` and `_ROWTIME(...)` by the window columns.
struct WindowColumns(&'static str);

impl VisitorMut for WindowColumns {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(function) = expr else { return ControlFlow::Continue(()) };
        let name = last_part(&function.name).to_ascii_uppercase();
        let column = match name.strip_prefix(self.0).and_then(|rest| rest.strip_prefix('_')) {
            Some("START") => "window_start",
            Some("END") => "window_end",
            Some("ROWTIME") => "window_time",
            _ => return ControlFlow::Continue(()),
        };
        *expr = Expr::Identifier(Ident::new(column));
        ControlFlow::Continue(())
    }
}

/// The window table functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tvf {
    Tumble,
    Hop,
    Cumulate,
    Session,
}

fn window_tvf(name: &ObjectName) -> Option<Tvf> {
    match last_part(name).to_ascii_uppercase().as_str() {
        "TUMBLE" => Some(Tvf::Tumble),
        "HOP" => Some(Tvf::Hop),
        "CUMULATE" => Some(Tvf::Cumulate),
        "SESSION" => Some(Tvf::Session),
        _ => None,
    }
}

fn last_part(name: &ObjectName) -> String {
    name.0.last().map(|p| p.as_ident().map_or_else(|| p.to_string(), |i| i.value.clone())).unwrap_or_default()
}

fn positional(arg: &FunctionArg) -> Option<&Expr> {
    match arg {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Some(expr),
        _ => None,
    }
}

fn join(args: &[&Expr]) -> String {
    args.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

fn is_column(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

fn usage(name: &str, form: &str) -> ErrorReport {
    ErrorReport::new(SqlState::UNDEFINED_FUNCTION, format!("{} takes {form}", name.to_uppercase()))
}

/// The derived table a window table function stands for.
fn derived_table(kind: Tvf, args: &[&Expr], alias: Option<String>) -> Result<TableFactor, ErrorReport> {
    let (name, form, sizes) = match kind {
        Tvf::Tumble => ("TUMBLE", "(table, time_column, size [, offset])", 1),
        Tvf::Hop => ("HOP", "(table, time_column, slide, size [, offset])", 2),
        Tvf::Cumulate => ("CUMULATE", "(table, time_column, step, size [, offset])", 2),
        Tvf::Session => ("SESSION", "(table, time_column, gap [, key ...])", 1),
    };
    let arity_ok = match kind {
        Tvf::Session => args.len() >= 3 && args[3..].iter().all(|k| is_column(k)),
        _ => args.len() == 2 + sizes || args.len() == 3 + sizes,
    };
    if !arity_ok || args.get(1).is_none_or(|time| !is_column(time)) {
        return Err(usage(name, form));
    }
    let table = match args[0] {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => args[0].to_string(),
        other => {
            return Err(ErrorReport::new(
                SqlState::SYNTAX_ERROR,
                format!("the first argument of {name} must name a table or view, not {other}"),
            ));
        }
    };
    let time = args[1].to_string();
    let rest = join(&args[2..]);
    // The size is the last interval before the optional offset.
    let size = args[1 + sizes].to_string();
    let alias = alias.unwrap_or_else(|| match args[0] {
        Expr::CompoundIdentifier(parts) => parts.last().map(Ident::to_string).unwrap_or_default(),
        other => other.to_string(),
    });
    let sql = match kind {
        Tvf::Session => {
            let keys = join(&args[3..]);
            let partition = if keys.is_empty() { String::new() } else { format!("PARTITION BY {keys} ") };
            let over = format!("OVER ({partition}ORDER BY {time})");
            format!(
                "SELECT * FROM (SELECT *, weir_prev_instant(window_end) AS window_time \
                 FROM (SELECT *, weir_session_start({time}, {size}) {over} AS window_start, \
                 weir_session_end({time}, {size}) {over} AS window_end FROM {table}) AS {alias}) AS {alias}"
            )
        }
        Tvf::Tumble => format!(
            "SELECT * FROM (SELECT *, window_start + {size} AS window_end, \
             weir_prev_instant(window_start + {size}) AS window_time \
             FROM (SELECT *, weir_tumble_start({time}, {rest}) AS window_start FROM {table}) AS {alias}) AS {alias}"
        ),
        Tvf::Hop => format!(
            "SELECT * FROM (SELECT *, window_start + {size} AS window_end, \
             weir_prev_instant(window_start + {size}) AS window_time \
             FROM (SELECT *, unnest(weir_hop_starts({time}, {rest})) AS window_start FROM {table}) AS {alias}) \
             AS {alias}"
        ),
        Tvf::Cumulate => {
            let offset = args.get(4).map(|o| format!(", {o}")).unwrap_or_default();
            format!(
                "SELECT * FROM (SELECT *, weir_prev_instant(window_end) AS window_time \
                 FROM (SELECT *, weir_tumble_start({time}, {size}{offset}) AS window_start, \
                 unnest(weir_cumulate_ends({time}, {rest})) AS window_end FROM {table}) AS {alias}) AS {alias}"
            )
        }
    };
    let query = Parser::new(&WEIR).try_with_sql(&sql).and_then(|mut p| p.parse_query()).map_err(|e| {
        ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: window rewrite: {e}: {sql}"))
    })?;
    match *query.body {
        SetExpr::Select(mut select) if select.from.len() == 1 => Ok(select.from.remove(0).relation),
        _ => Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: window rewrite")),
    }
}

fn parse_expr(sql: &str) -> Result<Expr, ErrorReport> {
    Parser::new(&WEIR)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: window rewrite: {e}")))
}

/// Turns Flink's `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), args...))` into `TUMBLE(t, ts, args...)` (also HOP and
/// CUMULATE), token by token, keeping every kept token's position for error messages. Anything that does not match
/// the whole shape is left as it is, for the parser to report.
pub fn flink_form(tokens: Vec<TokenWithSpan>) -> Vec<TokenWithSpan> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        match rewrite_at(&tokens, i) {
            Some((replacement, next)) => {
                out.extend(replacement);
                i = next;
            }
            None => {
                out.push(tokens[i].clone());
                i += 1;
            }
        }
    }
    out
}

fn rewrite_at(tokens: &[TokenWithSpan], start: usize) -> Option<(Vec<TokenWithSpan>, usize)> {
    // The shape starts at a word; starting elsewhere (a run of whitespace) would look ahead in vain at every token.
    if !matches!(tokens.get(start)?.token, Token::Word(_)) {
        return None;
    }
    let mut i = start;
    let next = |i: &mut usize| -> Option<usize> {
        while matches!(tokens.get(*i)?.token, Token::Whitespace(_)) {
            *i += 1;
        }
        let at = *i;
        *i += 1;
        Some(at)
    };
    let word = |at: usize, text: &str| matches!(&tokens[at].token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(text));
    if !word(next(&mut i)?, "TABLE") || tokens[next(&mut i)?].token != Token::LParen {
        return None;
    }
    let function = next(&mut i)?;
    if !["TUMBLE", "HOP", "CUMULATE", "SESSION"].iter().any(|f| word(function, f)) {
        return None;
    }
    let open = next(&mut i)?;
    if tokens[open].token != Token::LParen || !word(next(&mut i)?, "TABLE") {
        return None;
    }
    let mut out = vec![tokens[function].clone(), tokens[open].clone()];
    // The table name, up to the first comma, or (SESSION) up to PARTITION BY keys and their comma.
    let mut keys: Vec<TokenWithSpan> = Vec::new();
    let comma = loop {
        let at = next(&mut i)?;
        match &tokens[at].token {
            Token::Comma => {
                out.push(tokens[at].clone());
                break tokens[at].clone();
            }
            Token::Word(_) if word(at, "PARTITION") => {
                if !word(next(&mut i)?, "BY") {
                    return None;
                }
                // Keys up to the comma that precedes DESCRIPTOR.
                loop {
                    let key_at = next(&mut i)?;
                    let mut peek = i;
                    let follows_descriptor = next(&mut peek).is_some_and(|n| word(n, "DESCRIPTOR"));
                    match &tokens[key_at].token {
                        Token::Comma if follows_descriptor => {
                            out.push(tokens[key_at].clone());
                            break;
                        }
                        Token::Word(_) | Token::Period | Token::Comma => keys.push(tokens[key_at].clone()),
                        _ => return None,
                    }
                }
                break tokens[i.saturating_sub(1)].clone();
            }
            Token::Word(_) | Token::Period => out.push(tokens[at].clone()),
            _ => return None,
        }
    };
    // DESCRIPTOR(column)
    if !word(next(&mut i)?, "DESCRIPTOR") || tokens[next(&mut i)?].token != Token::LParen {
        return None;
    }
    let column = next(&mut i)?;
    if !matches!(tokens[column].token, Token::Word(_)) || tokens[next(&mut i)?].token != Token::RParen {
        return None;
    }
    out.push(tokens[column].clone());
    // The remaining arguments, up to the function's closing parenthesis.
    let mut depth = 1;
    loop {
        let at = next(&mut i)?;
        match tokens[at].token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::EOF => return None,
            _ => {}
        }
        if depth == 0 {
            // Partition keys of a SESSION go last: SESSION(t, ts, gap, key ...).
            if !keys.is_empty() {
                out.push(comma.clone());
                out.append(&mut keys);
            }
            out.push(tokens[at].clone());
            break;
        }
        out.push(tokens[at].clone());
    }
    // The closing parenthesis of TABLE( ... ).
    if tokens[next(&mut i)?].token != Token::RParen {
        return None;
    }
    Some((out, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{WeirStatement, parse_sql};

    fn rewritten(sql: &str) -> String {
        let mut statements = parse_sql(sql).unwrap();
        let WeirStatement::Sql(mut stmt) = statements.remove(0).statement else { panic!("not SQL") };
        rewrite_windows(&mut stmt).unwrap();
        stmt.to_string()
    }

    #[test]
    fn flink_and_short_forms_mean_the_same() {
        let short = rewritten("SELECT * FROM TUMBLE(bids, ts, INTERVAL '10' SECOND)");
        let flink = rewritten("SELECT * FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND))");
        assert_eq!(short, flink);
        assert!(short.contains("weir_tumble_start(ts, INTERVAL '10' SECOND) AS window_start FROM bids"), "{short}");
        let hop = rewritten(
            "SELECT * FROM TABLE(HOP(TABLE bids, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '10' SECOND)) AS h",
        );
        assert!(hop.contains("unnest(weir_hop_starts(ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND))"), "{hop}");
        assert!(hop.ends_with("AS h) AS h"), "{hop}");
    }

    #[test]
    fn session_flink_form_moves_partition_keys_last() {
        let flink = rewritten(
            "SELECT * FROM TABLE(SESSION(TABLE clicks PARTITION BY user_id, page, DESCRIPTOR(ts), INTERVAL '5' MINUTE))",
        );
        let short = rewritten("SELECT * FROM SESSION(clicks, ts, INTERVAL '5' MINUTE, user_id, page)");
        assert_eq!(flink, short);
        assert!(short.contains("OVER (PARTITION BY user_id, page ORDER BY ts) AS window_start"), "{short}");
    }

    #[test]
    fn legacy_group_windows_become_window_table_functions() {
        let sql = rewritten(
            "SELECT k, TUMBLE_START(ts, INTERVAL '30' SECOND), TUMBLE_END(ts, INTERVAL '30' SECOND), count(*) \
             FROM t GROUP BY k, TUMBLE(ts, INTERVAL '30' SECOND)",
        );
        let tvf = rewritten(
            "SELECT k, window_start, window_end, count(*) FROM TUMBLE(t, ts, INTERVAL '30' SECOND) \
             GROUP BY k, window_start, window_end",
        );
        assert_eq!(sql, tvf);
        // Sessions are kept apart per the other group keys.
        let session = rewritten(
            "SELECT user_id, SESSION_END(ts, INTERVAL '5' MINUTE) AS e, count(*) FROM clicks AS c \
             GROUP BY SESSION(ts, INTERVAL '5' MINUTE), user_id",
        );
        let tvf = rewritten(
            "SELECT user_id, window_end AS e, count(*) FROM SESSION(clicks, ts, INTERVAL '5' MINUTE, user_id) AS c \
             GROUP BY window_start, window_end, user_id",
        );
        assert_eq!(session, tvf);
    }

    #[test]
    fn a_tumbling_group_window_over_a_join_groups_on_the_window_start() {
        let sql = rewritten(
            "SELECT TUMBLE_START(a.ts, INTERVAL '30' SECOND), count(*) FROM a JOIN b ON a.k = b.k \
             GROUP BY TUMBLE(a.ts, INTERVAL '30' SECOND)",
        );
        assert!(sql.contains("GROUP BY weir_tumble_start(a.ts, INTERVAL '30' SECOND)"), "{sql}");
        let mut statements = parse_sql(
            "SELECT count(*) FROM a JOIN b ON a.k = b.k GROUP BY HOP(a.ts, INTERVAL '1' SECOND, INTERVAL '2' SECOND)",
        )
        .unwrap();
        let WeirStatement::Sql(mut stmt) = statements.remove(0).statement else { panic!("not SQL") };
        assert_eq!(rewrite_windows(&mut stmt).unwrap_err().code, SqlState::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn wrong_arguments_are_reported() {
        let mut statements = parse_sql("SELECT * FROM TUMBLE(bids, ts)").unwrap();
        let WeirStatement::Sql(mut stmt) = statements.remove(0).statement else { panic!("not SQL") };
        let err = rewrite_windows(&mut stmt).unwrap_err();
        assert_eq!(err.code, SqlState::UNDEFINED_FUNCTION);
        assert_eq!(err.message, "TUMBLE takes (table, time_column, size [, offset])");
    }

    #[test]
    fn a_partial_flink_shape_is_left_for_the_parser() {
        let err = parse_sql("SELECT * FROM TABLE(TUMBLE(TABLE bids, ts, INTERVAL '1' SECOND))").unwrap_err();
        assert_eq!(err.code, SqlState::SYNTAX_ERROR);
    }
}
