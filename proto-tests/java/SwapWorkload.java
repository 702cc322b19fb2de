// pgjdbc through the proxy while migrations swap table t (see
// proto-tests/python/swap_workload.py for the contract), with prepareThreshold=1 so every
// statement is a named server-side statement from its first execution.
//   java -cp /usr/share/java/postgresql.jar SwapWorkload.java JDBC_URL USER STOPFILE BASE
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.*;
import java.util.Properties;

public class SwapWorkload {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Path stop = Path.of(args[2]);
        long base = Long.parseLong(args[3]);
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("prepareThreshold", "1");
        long ops = 0, writes = 0, errors = 0;
        boolean said = false;
        try (Connection c = DriverManager.getConnection(url, p)) {
            PreparedStatement sel = c.prepareStatement("SELECT * FROM t WHERE id = ?");
            PreparedStatement upd = c.prepareStatement("UPDATE t SET n = n + 1 WHERE id = ?");
            PreparedStatement ins = c.prepareStatement("INSERT INTO t (id, v, n) VALUES (?, 'w', 0)");
            for (long i = 1; !Files.exists(stop); i++) {
                int id = (int) (1 + i % 50);
                try {
                    c.setAutoCommit(false);
                    sel.setInt(1, id);
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next() || rs.getLong("id") != id) throw new SQLException("wrong row");
                    }
                    upd.setInt(1, id);
                    upd.executeUpdate();
                    ins.setLong(1, base + i);
                    ins.executeUpdate();
                    c.commit();
                    writes++;
                    ops++;
                    Thread.sleep(5);
                    if (!said) {
                        said = true;
                        System.out.println("ready");
                        System.out.flush();
                    }
                } catch (SQLException e) {
                    errors++;
                    System.err.println("pgjdbc: " + e.getSQLState() + " " + e.getMessage());
                    try { c.rollback(); } catch (SQLException ignored) { }
                }
            }
        }
        System.out.println("done ops=" + ops + " writes=" + writes + " errors=" + errors);
        System.exit(errors > 0 ? 1 : 0);
    }
}
