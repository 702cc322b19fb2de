// Code written for the old shape of table `people` (see proto-tests/python/versions_client.py
// for the contract), on pgjdbc with prepareThreshold=1 so both statements are named
// server-side statements from their first execution, connected with the ApplicationName given.
// Without assumeMinServerVersion, pgjdbc does not send ApplicationName in the StartupMessage,
// where the proxy's route looks first: it runs `SET application_name` after logging in, and the
// proxy moves the connection to the route's version at its next transaction boundary (the
// server reports the new name in a ParameterStatus), before the first statement below.
//   java -cp /usr/share/java/postgresql.jar VersionsClient.java JDBC_URL USER APPNAME STOPFILE
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.*;
import java.util.Properties;

public class VersionsClient {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Path stop = Path.of(args[3]);
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("ApplicationName", args[2]);
        p.setProperty("prepareThreshold", "1");
        long ops = 0, errors = 0;
        try (Connection c = DriverManager.getConnection(url, p)) {
            PreparedStatement ins = c.prepareStatement("INSERT INTO people (full_name) VALUES (?)");
            PreparedStatement sel = c.prepareStatement("SELECT full_name FROM people WHERE full_name = ?");
            while (!Files.exists(stop)) {
                String v = "pgjdbc " + ops;
                try {
                    ins.setString(1, v);
                    ins.executeUpdate();
                    sel.setString(1, v);
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next() || !v.equals(rs.getString("full_name")) || rs.next()) {
                            throw new SQLException("wrong rows for " + v);
                        }
                    }
                    ops++;
                    if (ops == 1) {
                        System.out.println("ready");
                        System.out.flush();
                    }
                } catch (SQLException e) {
                    errors++;
                    System.err.println("pgjdbc: " + e.getSQLState() + " " + e.getMessage());
                }
                Thread.sleep(5);
            }
        }
        System.out.println("done ops=" + ops + " errors=" + errors);
        System.exit(errors > 0 ? 1 : 0);
    }
}
