<%@ page contentType="application/json" session="false" %><%
// Healthy when the sidecar is ready (state transfer complete).
// The sidecar: -Dsidecar (the tests) or $SESSIONMESH_HTTP (set by the webhook).
String sidecar = System.getProperty("sidecar");
if (sidecar == null) {
  String env = System.getenv("SESSIONMESH_HTTP");
  sidecar = "http://" + (env == null ? "127.0.0.1:7070" : env);
}
int code;
try {
  java.net.HttpURLConnection c = (java.net.HttpURLConnection) new java.net.URL(sidecar + "/readyz").openConnection();
  c.setConnectTimeout(500); c.setReadTimeout(500);
  code = c.getResponseCode();
} catch (java.io.IOException e) { code = 503; }
response.setStatus(code == 200 ? 200 : 503);
%>{"ok":<%= code == 200 %>}
