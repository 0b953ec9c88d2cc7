// pgjdbc (Debian's libpostgresql-jdbc-java) against Weir: a password login over TLS with verify-full, a wrong password
// refused, prepared statements, a result fetched in pages (setFetchSize inside a transaction: a portal suspended and
// resumed), COPY in and out through CopyManager, and DatabaseMetaData's getTables / getColumns (what Metabase and
// DBeaver read) listing tables, materialized views and sources with their types.
//
// Usage: java -cp postgresql.jar JdbcClient.java PORT PASSWORD ROOT_CERT
// Every expected value is worked out from the rows it writes.

import java.io.ByteArrayOutputStream;
import java.io.StringReader;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcClient {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    public static void main(String[] args) throws Exception {
        String port = args[0];
        String password = args[1];
        String rootCert = args[2];
        String url = "jdbc:postgresql://127.0.0.1:" + port + "/weir";
        Properties props = new Properties();
        props.setProperty("user", "weir");
        props.setProperty("password", password);
        props.setProperty("sslmode", "verify-full");
        props.setProperty("sslrootcert", rootCert);

        Properties wrong = (Properties) props.clone();
        wrong.setProperty("password", "not-" + password);
        try (Connection refused = DriverManager.getConnection(url, wrong)) {
            throw new AssertionError("a wrong password was accepted");
        } catch (SQLException e) {
            check("28P01".equals(e.getSQLState()), "wrong password: " + e.getSQLState() + " " + e.getMessage());
        }

        try (Connection conn = DriverManager.getConnection(url, props)) {
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE jdbc_readings (id BIGINT NOT NULL, site TEXT, kwh NUMERIC(10,2), ts TIMESTAMP(3))");
                st.execute("CREATE MATERIALIZED VIEW jdbc_per_site AS SELECT site, count(*) AS n FROM jdbc_readings GROUP BY site");
                st.execute("CREATE SOURCE jdbc_ticks (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts) "
                        + "WITH (connector = 'datagen', 'datagen.rows.per.second' = '1')");
            }
            // Prepared inserts with typed parameters: 1,000 rows, site-0 .. site-3.
            try (PreparedStatement insert = conn.prepareStatement("INSERT INTO jdbc_readings VALUES (?, ?, ?, ?)")) {
                for (int i = 1; i <= 1000; i++) {
                    insert.setLong(1, i);
                    insert.setString(2, "site-" + (i % 4));
                    insert.setBigDecimal(3, new java.math.BigDecimal(i).movePointLeft(2));
                    insert.setTimestamp(4, java.sql.Timestamp.valueOf("2024-01-01 00:00:00"));
                    insert.addBatch();
                }
                insert.executeBatch();
            }

            // A result fetched 100 rows at a time (pgjdbc suspends the portal between fetches).
            conn.setAutoCommit(false);
            try (PreparedStatement query = conn.prepareStatement("SELECT id FROM jdbc_readings WHERE id > ? ORDER BY id")) {
                query.setFetchSize(100);
                query.setLong(1, 500);
                long count = 0;
                long sum = 0;
                try (ResultSet rs = query.executeQuery()) {
                    while (rs.next()) {
                        count++;
                        sum += rs.getLong(1);
                    }
                }
                // 501 .. 1000: 500 rows summing to (501 + 1000) * 500 / 2.
                check(count == 500 && sum == 375250, "paged fetch: " + count + " rows, sum " + sum);
            }
            conn.commit();
            conn.setAutoCommit(true);

            // COPY through CopyManager: 3 rows in (CSV), then the site counts out.
            CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
            long copied = copy.copyIn("COPY jdbc_readings (id, site) FROM STDIN WITH (FORMAT csv)",
                    new StringReader("1001,site-9\n1002,site-9\n1003,site-9\n"));
            check(copied == 3, "copied in " + copied);
            try (Statement st = conn.createStatement()) {
                st.execute("FLUSH");
            }
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            long written = copy.copyOut("COPY (SELECT site, n FROM jdbc_per_site ORDER BY site) TO STDOUT WITH (FORMAT csv)", out);
            String csv = out.toString("UTF-8");
            check(written == 5, "copied out " + written);
            check(csv.equals("site-0,250\nsite-1,250\nsite-2,250\nsite-3,250\nsite-9,3\n"), "copy out: " + csv);

            // What BI tools read: tables by type, and columns with their JDBC and SQL types.
            DatabaseMetaData meta = conn.getMetaData();
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = meta.getTables(null, "public", "jdbc%", null)) {
                while (rs.next()) {
                    tables.add(rs.getString("TABLE_NAME") + ":" + rs.getString("TABLE_TYPE"));
                }
            }
            check(tables.contains("jdbc_readings:TABLE"), "getTables: " + tables);
            check(tables.contains("jdbc_per_site:MATERIALIZED VIEW"), "getTables: " + tables);
            check(tables.contains("jdbc_ticks:FOREIGN TABLE"), "getTables: " + tables);
            List<String> columns = new ArrayList<>();
            try (ResultSet rs = meta.getColumns(null, "public", "jdbc_readings", null)) {
                while (rs.next()) {
                    columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getInt("DATA_TYPE") + ":" + rs.getString("TYPE_NAME")
                            + ":" + rs.getInt("COLUMN_SIZE") + ":" + rs.getInt("DECIMAL_DIGITS") + ":" + rs.getInt("ORDINAL_POSITION")
                            + ":" + rs.getString("IS_NULLABLE"));
                }
            }
            // pgjdbc works the sizes out from the type modifier: numeric(10,2) is 10 digits, 2 after the point;
            // timestamp(3) is 22 characters before the fraction (a 6-digit year at worst) plus the point and 3 digits.
            List<String> expected = List.of(
                    "id:" + Types.BIGINT + ":int8:19:0:1:NO",
                    "site:" + Types.VARCHAR + ":text:2147483647:0:2:YES",
                    "kwh:" + Types.NUMERIC + ":numeric:10:2:3:YES",
                    "ts:" + Types.TIMESTAMP + ":timestamp:26:3:4:YES");
            check(columns.equals(expected), "getColumns: " + columns);
        }
        System.out.println("jdbc ok");
    }
}
