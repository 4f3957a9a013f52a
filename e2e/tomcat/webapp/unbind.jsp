<%@ page contentType="application/json" %><%
session.removeAttribute("bound");
%>{"node":"<%= System.getProperty("node", String.valueOf(System.getenv("HOSTNAME"))) %>"}
