{{/* Names, labels and the pieces every Vigil pod shares. */}}

{{- define "vigil.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vigil.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "ingest") */}}
{{- define "vigil.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vigil.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end -}}

{{/* The image runs as its non-root user; nothing is written outside /tmp. */}}
{{- define "vigil.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "vigil.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: ["ALL"]}
{{- end -}}

{{/* Pod annotations; (dict "root" $ "port" 9101) adds the scrape annotations for that port. */}}
{{- define "vigil.podAnnotations" -}}
{{- $annotations := deepCopy .root.Values.podAnnotations -}}
{{- if and .port .root.Values.prometheusScrapeAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .port) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- with $annotations -}}
annotations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "vigil.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name | quote }}
      key: {{ .ref.key | quote }}
{{- end -}}

{{/* VIGIL_PG_DSN for one role: (dict "root" $ "user" "vigil_app" "secret" {name,key}).
The password is read from its Secret into PG_PASSWORD, which the kubelet expands into the DSN
(it must therefore be URL-safe); no Vigil setting reads PG_PASSWORD itself. */}}
{{- define "vigil.pgEnv" -}}
{{- $pg := .root.Values.postgresql -}}
{{ include "vigil.secretEnv" (dict "name" "PG_PASSWORD" "ref" .secret) }}
- name: VIGIL_PG_DSN
  value: {{ printf "postgresql://%s:$(PG_PASSWORD)@%s:%v/%s" .user $pg.host $pg.port $pg.database | quote }}
{{- end -}}

{{- define "vigil.kafkaEnv" -}}
- name: VIGIL_KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
{{- end -}}

{{- define "vigil.mqttEnv" -}}
- name: VIGIL_MQTT_HOST
  value: {{ .Values.mqtt.host | quote }}
- name: VIGIL_MQTT_PORT
  value: {{ .Values.mqtt.port | quote }}
{{- end -}}

{{/* Every long-running process refuses to start without its secrets. */}}
{{- define "vigil.production" -}}
- name: VIGIL_ENVIRONMENT
  value: production
{{- end -}}

{{- define "vigil.caVolume" -}}
- name: mqtt-ca
  secret:
    secretName: {{ .Values.mqtt.caSecret.name | quote }}
    items:
      - {key: {{ .Values.mqtt.caSecret.key | quote }}, path: ca.crt}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "vigil.caMount" -}}
- {name: mqtt-ca, mountPath: /run/vigil, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "vigil.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "vigil.tmpMount" -}}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* Liveness on /healthz (the event loop answers), readiness on /readyz (the service's own
check: broker, Kafka, database, partitions), both on the ops port the service's settings read. */}}
{{- define "vigil.opsProbes" -}}
startupProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: ops}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}
