<%@ page contentType="application/json" session="false" %><%
jakarta.servlet.http.HttpSession s = request.getSession(false);
if (s != null) { s.invalidate(); }
%>{"user":null}
