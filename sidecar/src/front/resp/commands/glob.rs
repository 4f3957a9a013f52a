//! Redis glob patterns (SCAN MATCH), linear in the key length.

/// Redis glob matching: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative, with backtracking only to the last `*`: O(len(pattern) x
    // len(s)) whatever the pattern. A recursive matcher is exponential on
    // patterns like `a*a*a*a*b` (Redis had this flaw, CVE-2022-36021), and it
    // runs on the core task.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if p_at(pattern, pi) == Some(b'*') {
            while p_at(pattern, pi) == Some(b'*') {
                pi += 1;
            }
            star = Some((pi, si));
            continue;
        }
        if let Some(next) = glob_one(pattern, pi, s[si]) {
            pi = next;
            si += 1;
            continue;
        }
        match star {
            // Let the last `*` take one more byte and try again from there.
            Some((after_star, taken)) => {
                pi = after_star;
                si = taken + 1;
                star = Some((after_star, taken + 1));
            }
            None => return false,
        }
    }
    while p_at(pattern, pi) == Some(b'*') {
        pi += 1;
    }
    pi == pattern.len()
}

fn p_at(p: &[u8], i: usize) -> Option<u8> {
    p.get(i).copied()
}

/// Matches one byte against the pattern element at `pi` (not `*`): the index
/// after the element when it matches.
fn glob_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match p.get(pi)? {
        b'?' => Some(pi + 1),
        b'[' => {
            let mut i = pi + 1;
            let neg = p.get(i) == Some(&b'^');
            if neg {
                i += 1;
            }
            let mut hit = false;
            while i < p.len() && p[i] != b']' {
                if p[i] == b'\\' && i + 1 < p.len() {
                    hit |= p[i + 1] == c;
                    i += 2;
                } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                    let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
                    hit |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    hit |= p[i] == c;
                    i += 1;
                }
            }
            // An unterminated class matches nothing.
            (i < p.len() && hit != neg).then_some(i + 1)
        }
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        &lit => (lit == c).then_some(pi + 1),
    }
}
