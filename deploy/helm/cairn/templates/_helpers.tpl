{{/*
cairn.checkValues fails the render on values that the schema cannot see
are wrong together: a disk type given twice (two volumes of one name), and
a number of first members that does not match the peers listed (each peer
could then form a store of its own).
*/}}
{{- define "cairn.checkValues" -}}
{{- $seen := dict -}}
{{- range .Values.node.disks -}}
{{- if hasKey $seen .type -}}
{{- fail (printf "node.disks: disk type %q is given twice" .type) -}}
{{- end -}}
{{- $_ := set $seen .type true -}}
{{- end -}}
{{- $peers := len (splitList "," .Values.node.peers) -}}
{{- if ne (int .Values.node.bootstrapExpect) $peers -}}
{{- fail (printf "node.bootstrapExpect is %d but node.peers lists %d members: list exactly the first members" (int .Values.node.bootstrapExpect) $peers) -}}
{{- end -}}
{{- end -}}
