{{- define "vita-training.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vita-training.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vita
{{ include "vita-training.selectorLabels" . }}
{{- end -}}

{{- define "vita-training.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vita-training.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) -}}
{{- end -}}

{{/* Marker file `vita export` leaves for the engine Job; per revision, so an older run's marker never counts. */}}
{{- define "vita-training.exportDone" -}}
{{- printf "%s/.vita-export-done-r%d" .Values.output.mountPath (int .Release.Revision) -}}
{{- end -}}

{{/* The whole run on one node. torchrun takes every setting from PET_* variables (set by the indexed Job below,
or by the Kubeflow Trainer runtime), so the script is the same in both modes. */}}
{{- define "vita-training.script" -}}
set -eu
echo "node ${PET_NODE_RANK} of ${PET_NNODES}, ${PET_NPROC_PER_NODE} processes, rendezvous ${PET_MASTER_ADDR}:${PET_MASTER_PORT}"
{{- range .Values.stages }}
torchrun --no-python vita train --stage {{ .stage }} --config /etc/vita-training/stage{{ .stage }}.yaml{{ range .extraArgs }} {{ . | squote }}{{ end }}
{{- end }}
{{- if .Values.export.enabled }}
if [ "${PET_NODE_RANK}" = 0 ]; then
  vita export{{ range .Values.export.args }} {{ . | squote }}{{ end }}
  touch {{ include "vita-training.exportDone" . | squote }}
fi
{{- end }}
{{- end -}}

{{- define "vita-training.env" -}}
- {name: VITA_DATA_DIR, value: {{ .Values.data.mountPath | quote }}}
- {name: VITA_OUTPUT_DIR, value: {{ .Values.output.mountPath | quote }}}
- {name: VITA_HOME, value: /var/lib/vita}
- {name: HOME, value: /var/lib/vita}
- {name: PYTHONUNBUFFERED, value: "1"}
{{- end -}}

{{- define "vita-training.volumeMounts" -}}
- {name: data, mountPath: {{ .Values.data.mountPath }}, readOnly: true}
- {name: output, mountPath: {{ .Values.output.mountPath }}}
- {name: config, mountPath: /etc/vita-training, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /var/lib/vita}
- {name: shm, mountPath: /dev/shm}
{{- end -}}

{{- define "vita-training.volumes" -}}
- name: data
  persistentVolumeClaim: {claimName: {{ .Values.data.claimName }}, readOnly: true}
- name: output
  persistentVolumeClaim: {claimName: {{ .Values.output.claimName }}}
- name: config
  configMap: {name: {{ include "vita-training.fullname" . }}-config}
- name: tmp
  emptyDir: {sizeLimit: 16Gi}
- name: home
  emptyDir: {sizeLimit: 16Gi}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.shmSize }}}
{{- end -}}

{{- define "vita-training.resources" -}}
{{- $r := deepCopy .Values.resources -}}
{{- if gt (int .Values.gpusPerNode) 0 -}}
{{- $limits := default dict $r.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpusPerNode) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "vita-training.nproc" -}}
{{- if gt (int .Values.gpusPerNode) 0 }}{{ int .Values.gpusPerNode }}{{ else }}1{{ end -}}
{{- end -}}
