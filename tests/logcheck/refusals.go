package logcheck

import "strings"

// refusals are what Cairn logs when mutual TLS or its role checks refuse a
// caller (replication/meta/auth.go, replication/replica/server.go).
var refusals = []string{"meta API call refused", "replica connection refused", "needs a node certificate", "claim refused"}

// Refusals returns the lines of a log that record such a refusal. In a
// test whose every caller is Cairn's own, with the certificate it should
// have, each one is a wiring bug (a missing certificate, a wrong role or
// name).
func Refusals(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		for _, r := range refusals {
			if strings.Contains(l, r) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}
