<%@ page contentType="application/json" session="false" %><%
// Healthy when the sidecar is ready (state transfer complete).
int code;
try {
  java.net.HttpURLConnection c = (java.net.HttpURLConnection) new java.net.URL(System.getProperty("sidecar") + "/readyz").openConnection();
  c.setConnectTimeout(500); c.setReadTimeout(500);
  code = c.getResponseCode();
} catch (java.io.IOException e) { code = 503; }
response.setStatus(code == 200 ? 200 : 503);
%>{"ok":<%= code == 200 %>}
