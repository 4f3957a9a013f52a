//! `sessionmesh-sidecar demo`: the seed scenario, locally. Three app instances,
//! each with a sidecar, behind a cookie-sticky load balancer (HAProxy when
//! installed, else a built-in router). A user increments a counter 20 times;
//! the node holding the session is killed with SIGKILL (app and sidecar); the
//! next request lands elsewhere and the counter continues. Exits non-zero if
//! anything goes wrong.

use crate::demo::stack::{LbChoice, Stack, User};
use anyhow::{bail, Context};
use std::time::{Duration, Instant};

pub async fn run(lb: LbChoice) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let mut st = Stack::start(&bin, 3, &[], lb, "sync")
        .await
        .context("starting the stack")?;
    println!(
        "sessionmesh demo: 3 app instances, each with a sidecar, behind {} on {}",
        st.lb_name(),
        st.lb_addr
    );
    for i in 0..3 {
        let n = &st.cl.nodes[i];
        println!(
            "  {}: app 127.0.0.1:{}  sidecar http {}  replication {}  jvmRoute {}",
            n.name,
            st.app_ports[i],
            n.http.map(|a| a.to_string()).unwrap_or_default(),
            n.replication,
            n.route
        );
    }

    let mut user = User::new(st.lb_addr);
    let mut last = None;
    for _ in 0..20 {
        let v = user.visit().await?;
        if v.status != 200 {
            bail!("request failed with {}", v.status);
        }
        last = Some(v);
    }
    let Some(v) = last else { bail!("no response") };
    let holder = v.node.clone();
    println!(
        "\nuser clicked 20 times: counter = {:?}, served by {}, cookie JSESSIONID={}",
        v.counter.unwrap_or(0),
        holder,
        short(&v.session)
    );
    if v.counter != Some(20) {
        bail!("expected counter 20, got {:?}", v.counter);
    }

    let i = st.index_of(&holder).context("unknown node")?;
    st.kill_node(i);
    let t0 = Instant::now();
    println!("\nkill -9 {holder} (its app and its sidecar)");

    let (v, failed) = first_good_visit(&mut user, t0).await?;
    let took = t0.elapsed();
    println!(
        "next request: counter = {}, served by {}, {} ms after the kill, {} failed request(s) before it",
        v.counter.unwrap_or(0),
        v.node,
        took.as_millis(),
        failed
    );
    if v.rebound {
        println!("{} rebound the session to its own route: JSESSIONID={} (same session key, nothing copied)", v.node, short(&v.session));
    }
    if v.counter != Some(21) {
        bail!("session lost: expected counter 21, got {:?}", v.counter);
    }

    println!("\nrestarting {holder}: its sidecar receives every session before /readyz turns 200");
    st.restart_node(i).await?;
    let mut side = st.cl.client(i);
    let key = v.session.split('.').next().unwrap_or_default().to_owned();
    let r = side
        .get(&format!("/v1/sessions/{key}/attributes/counter"))
        .await?;
    println!(
        "{holder} is back in the load balancer and holds the session: counter = {}",
        r.text()
    );
    if r.text() != "21" {
        bail!("restarted {holder} does not hold the session");
    }
    println!("\nOK: the user stayed logged in through kill -9 of the node holding the session.");
    Ok(())
}

/// A session id shortened for printing: its first characters and its route.
fn short(s: &str) -> String {
    let head: String = s.chars().take(6).collect();
    format!("{head}…{}", s.find('.').map(|i| &s[i..]).unwrap_or(""))
}

/// Visits until a request succeeds (at most 10 s after `t0`); returns the
/// response and how many requests failed before it.
async fn first_good_visit(
    user: &mut User,
    t0: Instant,
) -> anyhow::Result<(crate::demo::stack::Visit, u32)> {
    let mut failed = 0;
    let v = loop {
        match user.visit().await {
            Ok(v) if v.status == 200 => break v,
            _ => failed += 1,
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("no good response within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok((v, failed))
}
