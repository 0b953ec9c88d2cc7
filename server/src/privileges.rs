//! Checking what a user may do ([`crate::users::Privilege`]) before a statement runs, and `GRANT` / `REVOKE`.
//!
//! DDL needs `CREATE`; a query needs `SELECT` on every user relation its plan scans (the system catalogs are open to
//! everyone); an `INSERT` needs `INSERT` on its table; a materialized view, a view or a sink needs `SELECT` on every
//! relation its query names. The superuser `weir` may do everything; only it grants and revokes. In trust mode (no
//! password, local development) every user acts as the superuser.

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::{LogicalPlan, WriteOp};
use datafusion::sql::sqlparser::ast::{self, Action, GrantObjects, Privileges, Statement};
use weir_common::{ErrorReport, SqlState};
use weir_planner::{ParsedStatement, WeirStatement};

use crate::session::{Outcome, Session, object_name};
use crate::users::{Privilege, SUPERUSER};

fn denied(what: &str) -> ErrorReport {
    ErrorReport::new(SqlState::INSUFFICIENT_PRIVILEGE, format!("permission denied {what}"))
}

impl Session {
    /// Whether the user may do everything: the superuser, or anyone in trust mode.
    pub(crate) fn superuser(&self) -> bool {
        !self.engine.passwords_required || self.user() == SUPERUSER
    }

    fn may(&self, privilege: Privilege, relation: &str) -> bool {
        self.superuser() || self.engine.users.allowed(self.user(), privilege, relation)
    }

    /// Refuses a statement the user may not run (before it is planned; reads are checked on the plan).
    pub(crate) fn authorize(&self, statement: &ParsedStatement) -> Result<(), ErrorReport> {
        if self.superuser() {
            return Ok(());
        }
        let ddl = match &statement.statement {
            WeirStatement::CreateSource(_)
            | WeirStatement::CreateMaterializedView { .. }
            | WeirStatement::DropSource { .. }
            | WeirStatement::CreateSink(_)
            | WeirStatement::DropSink { .. } => true,
            WeirStatement::Sql(stmt) => !matches!(
                stmt.as_ref(),
                Statement::Query(_)
                    | Statement::Explain { .. }
                    | Statement::ExplainTable { .. }
                    | Statement::Insert(_)
                    | Statement::Set(_)
                    | Statement::ShowVariable { .. }
                    | Statement::ShowVariables { .. }
                    | Statement::ShowTables { .. }
                    | Statement::ShowViews { .. }
                    | Statement::ShowColumns { .. }
                    | Statement::StartTransaction { .. }
                    | Statement::Commit { .. }
                    | Statement::Rollback { .. }
                    | Statement::Savepoint { .. }
                    | Statement::ReleaseSavepoint { .. }
                    | Statement::Discard { .. }
                    | Statement::Deallocate { .. }
                    | Statement::Grant(_)
                    | Statement::Revoke(_)
                    | Statement::Copy { .. }
                    | Statement::Close { .. }
            ),
            _ => false,
        };
        match ddl && !self.may(Privilege::Create, "") {
            true => Err(denied("to create or drop objects (it needs GRANT CREATE ON SCHEMA public)")),
            false => Ok(()),
        }
    }

    /// Refuses a plan that reads a user relation without `SELECT` on it, or inserts into a table without `INSERT`.
    pub(crate) fn check_plan(&self, plan: &LogicalPlan) -> Result<(), ErrorReport> {
        if self.superuser() {
            return Ok(());
        }
        let mut refused = None;
        let _ = plan.apply_with_subqueries(|node| {
            let (privilege, table) = match node {
                LogicalPlan::TableScan(scan) => (Privilege::Select, scan.table_name.table().to_string()),
                LogicalPlan::Dml(dml) if matches!(dml.op, WriteOp::Insert(_)) => {
                    (Privilege::Insert, dml.table_name.table().to_string())
                }
                _ => return Ok(TreeNodeRecursion::Continue),
            };
            // Only relations of the catalog need privileges: the system catalogs are everyone's.
            if self.engine.catalog.get(&table).is_some() && !self.may(privilege, &table) {
                refused = Some((privilege, table));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        match refused {
            Some((Privilege::Insert, table)) => Err(denied(&format!("for table {table} (it needs INSERT)"))),
            Some((_, relation)) => Err(denied(&format!("for relation {relation} (it needs SELECT)"))),
            None => Ok(()),
        }
    }

    /// Refuses writing table `table` (`COPY FROM`) without `INSERT` on it.
    pub(crate) fn check_insert(&self, table: &str) -> Result<(), ErrorReport> {
        match self.may(Privilege::Insert, table) {
            true => Ok(()),
            false => Err(denied(&format!("for table {table} (it needs INSERT)"))),
        }
    }

    /// Refuses a view or sink whose query names a relation the user may not read.
    pub(crate) fn check_reads(&self, relations: &[String]) -> Result<(), ErrorReport> {
        match relations.iter().find(|r| self.engine.catalog.get(r).is_some() && !self.may(Privilege::Select, r)) {
            Some(relation) => Err(denied(&format!("for relation {relation} (it needs SELECT)"))),
            None => Ok(()),
        }
    }

    /// `GRANT` / `REVOKE` of `SELECT`, `INSERT` (on relations, or on all tables in schema `public`) and `CREATE` (on
    /// schema `public` or database `weir`) to users; only the superuser may.
    pub(crate) fn grant(&self, statement: &Statement) -> Result<Outcome, ErrorReport> {
        let (privileges, objects, grantees, grant) = match statement {
            Statement::Grant(g) => (&g.privileges, &g.objects, &g.grantees, true),
            Statement::Revoke(r) => (&r.privileges, &r.objects, &r.grantees, false),
            _ => return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a GRANT")),
        };
        if !self.superuser() {
            return Err(denied(&format!("to grant or revoke: only \"{SUPERUSER}\" may")));
        }
        let unsupported = |what: &str| {
            ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("{what} is not supported; Weir grants SELECT, INSERT and CREATE"),
            )
        };
        let relations: Vec<String> = match objects {
            Some(GrantObjects::Tables(names)) => names.iter().map(object_name).collect::<Result<_, _>>()?,
            Some(GrantObjects::AllTablesInSchema { .. }) => vec!["*".to_string()],
            Some(GrantObjects::Schemas(_)) | Some(GrantObjects::Databases(_)) => Vec::new(),
            _ => return Err(unsupported("this kind of object")),
        };
        let actions: Vec<Privilege> = match privileges {
            Privileges::All { .. } if relations.is_empty() => vec![Privilege::Create],
            Privileges::All { .. } => vec![Privilege::Select, Privilege::Insert],
            Privileges::Actions(actions) => actions
                .iter()
                .map(|action| match action {
                    Action::Select { .. } => Ok(Privilege::Select),
                    Action::Insert { .. } => Ok(Privilege::Insert),
                    Action::Create { .. } => Ok(Privilege::Create),
                    other => Err(unsupported(&format!("privilege {other}"))),
                })
                .collect::<Result<_, _>>()?,
        };
        for relation in &relations {
            if relation != "*" && self.engine.catalog.get(relation).is_none() {
                return Err(ErrorReport::new(
                    SqlState::UNDEFINED_TABLE,
                    format!("relation \"{relation}\" does not exist"),
                ));
            }
        }
        for grantee in grantees {
            let Some(ast::GranteeName::ObjectName(name)) = &grantee.name else {
                return Err(unsupported("this grantee"));
            };
            let user = object_name(name)?;
            for privilege in &actions {
                match (privilege, relations.is_empty()) {
                    (Privilege::Create, true) => self.engine.users.change(&user, *privilege, "", grant)?,
                    (Privilege::Create, false) | (_, true) => {
                        return Err(unsupported("this privilege on this kind of object"));
                    }
                    (_, false) => {
                        for relation in &relations {
                            self.engine.users.change(&user, *privilege, relation, grant)?;
                        }
                    }
                }
            }
        }
        Ok(Outcome::Command(if grant { "GRANT" } else { "REVOKE" }, None))
    }
}
