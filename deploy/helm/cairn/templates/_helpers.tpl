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

{{/*
cairn.issueCertificate is the init container that issues a pod's
certificate from the cluster CA (the Secret tls.caSecret, mounted at /ca)
into the memory-backed volume tls, which the pod's cairn container reads
with --tls-dir=/tls. Called with a dict: root (the chart's context), role
and name (of the certificate), env (the container's environment, to
expand $(VAR) in name).
*/}}
{{- define "cairn.issueCertificate" -}}
- name: issue-certificate
  image: {{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  args:
    - ca
    - issue
    - --ca-dir=/ca
    - --role={{ .role }}
    - --name={{ .name }}
    - --out=/tls
    - --validity={{ .root.Values.tls.validity }}
  {{- with .env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
  volumeMounts:
    - name: cluster-ca
      mountPath: /ca
      readOnly: true
    - name: tls
      mountPath: /tls
{{- end -}}

{{/*
cairn.tlsVolumes are the volumes of cairn.issueCertificate: the CA's
Secret, readable by root only, and the pod's certificate, in memory.
*/}}
{{- define "cairn.tlsVolumes" -}}
- name: cluster-ca
  secret:
    secretName: {{ .Values.tls.caSecret }}
    defaultMode: 0400
- name: tls
  emptyDir:
    medium: Memory
{{- end -}}
